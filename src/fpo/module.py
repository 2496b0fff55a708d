"""`FPOLightningModule`: one Lightning module for DPO, SimPO, TDPO-1/2 and FPO.

It holds the policy, the frozen SAE (FPO only) and a reference source (an online frozen
model, or the offline cache's per-row fields in the batch). A training step is: batch ->
reference statistics -> the policy's statistics (`fpo.forward.response_stats`: trunk + SAE
hook, chunked LM head on response positions, fused with the reference's head for TDPO's KL;
per-row log-probs, pooled SAE features) -> objective -> metrics.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchmetrics import MeanMetric

from fpo import losses
from fpo.checkpoints import FROZEN_PREFIXES, check_policy_state, restore_rng_states, rng_states
from fpo.errors import UserError
from fpo.forward import ResponseStats, StatsRequest, response_stats
from fpo.logprobs import response_positions
from fpo.models.hf import split_causal_lm
from fpo.nonfinite import NonFiniteGuard
from fpo.objective import Objective
from fpo.packing import Packing, check_packable
from fpo.reference.base import ReferenceSource
from fpo.sae import match_sae_dtype, reconstruction_report, resolve_hook_module
from fpo.strategies import gathered_parameters

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


#: Optimizers with a fused (single-kernel, no temporaries) step in torch on CPU and CUDA.
FUSABLE = (torch.optim.Adam, torch.optim.AdamW)


def fused_kwargs(factory: Callable, params: list[Tensor]) -> dict:
    """``{"fused": True}`` when ``factory`` builds Adam/AdamW, neither ``fused`` nor ``foreach``
    was configured, and every parameter is a plain floating tensor on CPU or CUDA.

    The default (``foreach``) AdamW step allocates temporaries the size of all parameters
    (e.g. ``sqrt(exp_avg_sq)``): about 1 GiB more peak memory for gemma-3-270m in fp32, and
    several passes over memory; the fused step does one pass and allocates nothing.
    """
    func = getattr(factory, "func", factory)
    preset = getattr(factory, "keywords", {}) or {}
    if func not in FUSABLE or "fused" in preset or "foreach" in preset or not params:
        return {}
    plain = all(
        type(p.data) is Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
        for p in params
    )
    return {"fused": True} if plain else {}


class FPOLightningModule(L.LightningModule):
    """Preference optimisation of ``policy`` with a composed objective (``fpo.objective``).

    Built by `fpo.builder` (from a config, or `fpo.builder.assemble_module` from parts).

    Args:
        policy: a Hugging Face causal LM (trained).
        objective: an :class:`~fpo.objective.Objective`, validated by the builder.
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` partial, stepped every optimizer step;
            if it takes ``num_training_steps`` the trainer's estimate is passed.
        reference: where reference statistics come from (``None`` when nothing needs one).
        sae: frozen sae-lens SAE (the feature constraint only), already checked against the
            policy by the caller.
        hook_name: the SAE's hook, resolved once by the caller (``fpo.sae.sae_hook_name``).
        logits_chunk_size: response positions per LM-head chunk (``None``: all at once).
        checkpoint_logits: recompute each logits chunk in backward (memory O(chunk * V)).
        packing: run the policy trunk on the batch's real tokens only (`fpo.packing`;
            ``None``: on the padded batch). Same results up to float rounding.
        sae_report_batches: batches used for the start-up SAE reconstruction report.
        nonfinite: ``stop`` (raise :class:`~fpo.nonfinite.NonFiniteError`, naming the step
            and the example ids) or ``skip`` (drop that optimizer step's update, count it
            in ``train/skipped_nonfinite``) on a non-finite training loss or gradient.

    ``logps/chosen`` and ``logps/rejected`` are the log-probs the margin uses: sums for
    margin ``dpo`` (DPO, TDPO), per-token averages for ``ln_dpo``/``simpo`` (FPO, SimPO).
    """

    def __init__(
        self,
        policy: nn.Module,
        objective: Objective,
        optimizer: Callable,
        scheduler: Callable | None = None,
        reference: ReferenceSource | None = None,
        sae: nn.Module | None = None,
        hook_name: str | None = None,
        logits_chunk_size: int | None = None,
        checkpoint_logits: bool = False,
        sae_report_batches: int = 2,
        nonfinite: str = "stop",
        packing: Packing | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(objective, Objective):  # parsed and validated by fpo.builder
            raise TypeError(f"objective must be an Objective, not {type(objective).__name__}")
        self.objective, needs = objective, objective.needs
        if needs.reference and reference is None:
            raise UserError(f"objective={objective.name} needs a reference (reference=...).")
        if needs.features and (sae is None or not hook_name):
            raise ValueError(f"objective={objective.name}: the feature term needs an SAE and hook.")
        # from_pretrained returns eval mode and Lightning keeps the modes it is given.
        self.policy = policy.train()
        self.parts = split_causal_lm(policy)
        self.reference = reference
        self.sae = sae if needs.features else None
        self.hook_name = hook_name if needs.features else None
        if self.sae is not None:
            self.sae.requires_grad_(False).eval()
            resolve_hook_module(policy, self.hook_name)  # fail at start-up, not at step 1
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.logits_chunk_size = logits_chunk_size
        self.checkpoint_logits = checkpoint_logits
        if packing is not None:
            check_packable(policy)
        self.packing = packing
        self.sae_report_batches = sae_report_batches
        # Checkpoints hold the policy only; on_load_checkpoint checks every policy weight.
        self.strict_loading = False
        self.nonfinite = NonFiniteGuard(nonfinite)
        self.save_hyperparameters(
            {
                "objective": OmegaConf.to_container(
                    OmegaConf.structured(self.objective), enum_to_str=True
                )
            }
        )
        names = METRIC_NAMES + tuple(
            f"{term.stat}/{side}"
            for term in self.objective.constraints.active()
            for side in ("chosen", "rejected")
        )
        self.metrics = nn.ModuleDict(
            {
                self._key(f"{split}/{name}"): MeanMetric()
                for split in ("train", "val")
                for name in names
            }
        )
        # Lightning's ThroughputMonitor asks for this; FLOPs are not counted here.
        self.flops_per_batch = None

    @property
    def hook_module(self) -> nn.Module | None:
        """The policy module whose output the SAE reads (not registered as a child)."""
        return None if self.hook_name is None else resolve_hook_module(self.policy, self.hook_name)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__")

    # ---------------------------------------------------------------- the step
    def preference_step(self, batch: dict) -> tuple[losses.PreferenceLoss, dict[str, Tensor]]:
        """Per-pair losses and per-row ``[2B]`` statistics for a batch of ``B`` pairs.

        ``stats`` holds ``logps`` (the field the margin uses) and each active constraint's
        value by its ``stat`` name (``kl``, ``fmse``).
        """
        needs = self.objective.needs
        positions = response_positions(batch["labels"])
        ref = None
        if needs.reference:  # first: its passing peak (an LM head) meets no policy activations
            ref = self.reference.stats(
                batch, positions, features=needs.features, token_kl=needs.reference_logits
            )
        fused_kl = ref.head_inputs if needs.reference_logits else None  # TDPO's full-vocab KL
        policy = self._response_stats(batch, positions, StatsRequest.for_policy(needs), fused_kl)
        stats: dict[str, Tensor] = {"kl": policy.kl} if needs.reference_logits else {}
        ref_logps = policy.ref_logps if needs.reference_logits else ref.logps if ref else None
        if needs.features:
            stats["fmse"] = losses.feature_mse(
                policy.pooled,
                ref.topk_indices,
                ref.topk_values,
                k=self.objective.feature_k,
                normalize=self.objective.constraints.features.normalize,
            )
        result = self.objective.loss(policy.logps, ref_logps, stats)
        stats["logps"] = getattr(policy.logps, self.objective.logps_field).detach()
        return result, stats

    def _response_stats(self, batch, positions, request, reference=None) -> ResponseStats:
        """The policy's :func:`fpo.forward.response_stats` with this module's settings."""
        settings = dict(hook_module=self.hook_module, sae=self.sae, packing=self.packing)
        settings |= dict(logits_chunk_size=self.logits_chunk_size, reference=reference)
        settings |= dict(checkpoint_logits=self.checkpoint_logits)
        return response_stats(self.parts, batch, positions, request, **settings)

    def _shared_step(self, batch: dict, split: str) -> Tensor:
        result, stats = self.preference_step(batch)
        loss = result.losses.mean()
        ids = list(batch.get("example_id") or [])
        if split == "train":
            self.nonfinite.seen(ids)
        if not torch.isfinite(loss):
            self.nonfinite.bad_loss(self, split, loss, ids)
            # skip: no metrics; a zero loss keeps backward (and DDP) in step
            return torch.where(torch.isfinite(result.losses), result.losses, 0.0).sum() * 0.0
        values = {
            "loss": result.losses.detach(),
            "rewards/chosen": result.chosen_rewards,
            "rewards/rejected": result.rejected_rewards,
            "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float(),
            "rewards/margins": result.chosen_rewards - result.rejected_rewards,
        }
        for name in stats:
            if self._key(f"{split}/{name}/chosen") in self.metrics:
                chosen, rejected = stats[name].detach().chunk(2)
                values[f"{name}/chosen"], values[f"{name}/rejected"] = chosen, rejected
        for name, value in values.items():
            metric = self.metrics[self._key(f"{split}/{name}")]
            metric.update(value.float())
            if split == "val":
                self.log(f"val/{name}", metric, on_epoch=True, batch_size=result.losses.shape[0])
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    # --------------------------------------------------- per-optimizer-step logs
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step, then the gradients freed: Lightning zeroes them inside the next
        step's closure, after its forward, so they would sit beside that forward's
        activations (one fp32 copy of the trainable weights: 1 GiB for gemma-3-270m)."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.policy.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log ``train/*`` once per optimizer step.

        The metrics aggregate every micro-batch of the step (gradient accumulation) and,
        through torchmetrics' ``compute``, every device; then they restart.
        """
        self.nonfinite.before_optimizer_step(self)
        for name, metric in self.metrics.items():
            if name.startswith("train__") and metric.update_count:
                short = name.removeprefix("train__")
                self.log(
                    name.replace("__", "/"),
                    metric.compute(),
                    on_step=True,
                    prog_bar=short in ("loss", "rewards__accuracies"),
                )
                metric.reset()

    # ------------------------------------------------------------- start-up
    def on_fit_start(self) -> None:
        if self.sae is not None:
            match_sae_dtype(self.sae)  # the strategy may have cast it (DeepSpeed bf16)
        if self.sae is not None and self.sae_report_batches > 0:
            report = self.sae_reconstruction_report(self.sae_report_batches)
            self.print(
                f"SAE at {self.hook_name}: variance explained "
                f"{report['variance_explained']:.3f}, L0 {report['l0']:.1f}, "
                f"dead {report['dead_fraction']:.1%} on {report['positions']} response positions"
            )
            for logger in self.loggers:
                logger.log_metrics({f"sae/{k}": float(v) for k, v in report.items()}, step=0)

    @torch.no_grad()
    def sae_reconstruction_report(self, num_batches: int) -> dict[str, float]:
        """Reconstruction quality of the SAE on the policy's activations (training data)."""
        loader = self.trainer.datamodule.train_dataloader()
        activations = []
        for i, batch in enumerate(loader):
            if i == num_batches:
                break
            batch = self.transfer_batch_to_device(batch, self.device, 0)
            positions = response_positions(batch["labels"])
            out = self._response_stats(batch, positions, StatsRequest(hooked=True))
            activations.append(out.hooked)
        acts = torch.cat(activations)
        with gathered_parameters(self.sae):  # ZeRO-3: outside a forward, partitioned
            report = reconstruction_report(self.sae, acts.to(self.sae.W_dec.dtype))
        return {**report, "positions": acts.shape[0]}

    # ---------------------------------------------------------- optimisation
    def _grad_scaler(self):
        """The precision plugin's ``GradScaler`` (``16-mixed``), or ``None`` (fp32, bf16)."""
        trainer = self._trainer
        return getattr(trainer.precision_plugin, "scaler", None) if trainer is not None else None

    def _clips_under_grad_scaler(self) -> bool:
        """Gradient clipping with fp16 loss scaling: a fused AdamW unscales the gradients
        inside its step, after clipping would have seen them scaled, so it is not used."""
        trainer = self._trainer
        return bool(trainer is not None and trainer.gradient_clip_val and self._grad_scaler())

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ) -> None:
        """Under FSDP, clip by the norm over all shards with the root's ``clip_grad_norm_``
        (Lightning's FSDP precision plugin refuses ``gradient_clip_algorithm='norm'``, and
        ``torch.nn.utils.clip_grad_norm_`` would see only this rank's shard). A fused
        optimizer under ``bf16-mixed`` is clipped here with torch's ``clip_grad_norm_`` /
        ``clip_grad_value_``: Lightning's mixed-precision plugin refuses to clip any fused
        optimizer because it would unscale fp16 gradients itself, but bf16 has no scaler, so
        the gradients are already true ones (the fused step saves ~45 ms per step on the
        Gemma-2-2B shape on an H100, docs/benchmarks.md). Elsewhere Lightning's own clipping."""
        from lightning.pytorch.plugins.precision import MixedPrecision
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self._trainer.strategy.model if self._trainer is not None else None
        if (
            isinstance(root, FullyShardedDataParallel)
            and gradient_clip_val
            and gradient_clip_algorithm in (None, "norm")
        ):
            root.clip_grad_norm_(gradient_clip_val)
            return
        plugin = getattr(self._trainer, "precision_plugin", None)
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and isinstance(plugin, MixedPrecision):
            if self._grad_scaler() is not None:  # only with a fused optimizer asked for
                raise UserError(
                    "optimizer.fused=true with trainer.precision=16-mixed and gradient "
                    "clipping: a fused optimizer unscales fp16 gradients inside its step, so "
                    "clipping would see them scaled. Drop optimizer.fused, use bf16-mixed, or "
                    "set trainer.gradient_clip_val=null."
                )
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm == "value":  # a str or Lightning's str enum
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        fused = fused_kwargs(self.optimizer_factory, params)
        if fused and self._clips_under_grad_scaler():
            fused = {}  # fp16 loss scaling: clipping must see unscaled gradients
        optimizer = self.optimizer_factory(params, **fused)
        if self.scheduler_factory is None:
            return optimizer
        kwargs = {}
        preset = getattr(self.scheduler_factory, "keywords", {})
        accepts = inspect.signature(self.scheduler_factory).parameters
        if "num_training_steps" in accepts and "num_training_steps" not in preset:
            kwargs["num_training_steps"] = self.trainer.estimated_stepping_batches
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_train_end(self) -> None:
        """Free the optimizer state and the gradients once training is over.

        Lightning runs the callbacks' ``on_train_end`` first, so the checkpoints (``last``
        included) already hold the state. Kept, Lightning's teardown would copy it to the
        CPU (two fp32 copies of the policy: about 21 GB and 20 s for Gemma-2-2B on an H100)
        and the evaluation after fit would run beside it.
        """
        for optimizer in self.trainer.optimizers:
            state = getattr(optimizer, "state", None)
            if isinstance(state, dict):  # torch optimizers; DeepSpeed's keep their own
                state.clear()
        self.policy.zero_grad(set_to_none=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints to the policy (the reference and SAE are frozen inputs); add the
        RNG states and the count of skipped non-finite steps."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        checkpoint["fpo"] = {"rng": rng_states(), "skipped_nonfinite": self.nonfinite.skipped}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuse a checkpoint that lacks a policy weight or does not fit (UserError naming
        the keys); restore the RNG states and the skipped-step count."""
        check_policy_state(self.state_dict(), checkpoint["state_dict"])
        extra = checkpoint.get("fpo") or {}
        if "rng" in extra:
            restore_rng_states(extra["rng"])
        self.nonfinite.skipped = int(extra.get("skipped_nonfinite", 0))
