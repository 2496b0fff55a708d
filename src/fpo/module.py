"""`FPOLightningModule`: one Lightning module for DPO, SimPO, TDPO-1/2 and FPO.

It holds the policy, the frozen SAE (FPO only) and a reference source (an online frozen
model, or the offline cache's per-row fields in the batch). A training step is:

    batch -> response positions -> policy trunk forward (+ SAE hook capture)
          -> LM head on response positions only, chunked (+ reference logits for TDPO's KL)
          -> per-row log-probs / pooled SAE features -> objective -> metrics
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from fpo import objectives
from fpo.errors import UserError
from fpo.forward import forward_response_positions
from fpo.logprobs import response_positions, response_token_stats, segment_sum, sequence_logps
from fpo.methods import compute_loss, get_method, halves
from fpo.models.hf import split_causal_lm
from fpo.reference.base import ReferenceSource
from fpo.sae import (
    check_sae_fits_model,
    encode_pooled,
    reconstruction_report,
    resolve_hook_module,
    sae_hook_name,
)

METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
TDPO_METRICS = ("kl/chosen", "kl/rejected")
FPO_METRICS = ("fmse/chosen", "fmse/rejected")


class FPOLightningModule(L.LightningModule):
    """Preference optimisation of ``policy`` with the objective named by ``objective.name``.

    Args:
        policy: a Hugging Face causal LM (trained).
        objective: ``{"name": dpo|simpo|tdpo1|tdpo2|fpo, "beta": ..., ...}`` (Hydra group).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``).
        scheduler: ``optimizer -> LRScheduler`` partial, stepped every optimizer step;
            if it takes ``num_training_steps`` the trainer's estimate is passed.
        reference: where reference statistics come from (``None`` for SimPO).
        sae: frozen sae-lens SAE (FPO only).
        hook_name: overrides the SAE's own hook name.
        logits_chunk_size: response positions per LM-head chunk (``None``: all at once).
        checkpoint_logits: recompute each logits chunk in backward (memory O(chunk * V)).
        sae_report_batches: batches used for the start-up SAE reconstruction report.

    ``logps/chosen`` and ``logps/rejected`` are the log-probs the objective uses: sums for
    DPO/TDPO, per-token averages for SimPO/FPO (as TRL logs them).
    """

    def __init__(
        self,
        policy: nn.Module,
        objective: Mapping,
        optimizer: Callable,
        scheduler: Callable | None = None,
        reference: ReferenceSource | None = None,
        sae: nn.Module | None = None,
        hook_name: str | None = None,
        logits_chunk_size: int | None = None,
        checkpoint_logits: bool = False,
        sae_report_batches: int = 2,
    ) -> None:
        super().__init__()
        self.objective = dict(objective)
        self.method = get_method(self.objective)
        if self.method.reference and reference is None:
            raise UserError(f"objective={self.method.name} needs a reference (reference=...).")
        if self.method.features and sae is None:
            raise UserError("objective=fpo needs an SAE (sae=...).")
        # from_pretrained returns eval mode and Lightning keeps the modes it is given.
        self.policy = policy.train()
        self.parts = split_causal_lm(policy)
        self.reference = reference
        self.sae = sae if self.method.features else None
        self.hook_name = None
        if self.sae is not None:
            self.sae.requires_grad_(False).eval()
            check_sae_fits_model(self.sae, policy)
            self.hook_name = hook_name or sae_hook_name(self.sae)
            resolve_hook_module(policy, self.hook_name)  # fail at start-up, not at step 1
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.logits_chunk_size = logits_chunk_size
        self.checkpoint_logits = checkpoint_logits
        self.sae_report_batches = sae_report_batches
        self.strict_loading = False  # checkpoints hold the policy only
        self.save_hyperparameters({"objective": self.objective})
        names = METRIC_NAMES + (TDPO_METRICS if self.method.token_kl else ())
        names += FPO_METRICS if self.method.features else ()
        self.metrics = nn.ModuleDict(
            {
                self._key(f"{split}/{name}"): MeanMetric()
                for split in ("train", "val")
                for name in names
            }
        )
        self._step_started = 0.0
        self._tokens_since_step = 0

    @property
    def hook_module(self) -> nn.Module | None:
        """The policy module whose output the SAE reads (not registered as a child)."""
        return None if self.hook_name is None else resolve_hook_module(self.policy, self.hook_name)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace("/", "__")

    # ---------------------------------------------------------------- the step
    def preference_step(self, batch: dict) -> tuple[objectives.PreferenceLoss, dict[str, Tensor]]:
        """Per-pair losses and per-row statistics for a batch of ``B`` pairs."""
        method = self.method
        positions = response_positions(batch["labels"])
        rows = positions.num_rows
        policy_out = forward_response_positions(self.parts, batch, positions, self.hook_module)
        ref = None
        if method.reference:
            ref = self.reference.stats(
                batch, positions, features=method.features, token_kl=method.token_kl
            )
        tokens = response_token_stats(
            policy_out.hidden,
            self.parts.head,
            positions.targets,
            self.logits_chunk_size,
            ref_hidden=ref.hidden if method.token_kl else None,
            ref_head=ref.head if method.token_kl else None,
            checkpoint=self.checkpoint_logits,
        )
        policy_logps = sequence_logps(tokens.policy_logps, positions.rows, rows)
        stats: dict[str, Tensor] = {}
        seq_kl = feature_mse = None
        ref_logps = ref.logps if ref is not None else None
        if method.token_kl:
            ref_logps = sequence_logps(tokens.ref_logps, positions.rows, rows)
            seq_kl = stats["kl"] = segment_sum(tokens.kl, positions.rows, rows)
        if method.features:
            pooled = encode_pooled(self.sae, policy_out.hooked, positions.rows, rows)
            feature_mse = stats["fmse"] = objectives.feature_mse(
                pooled, ref.topk_indices, ref.topk_values, k=self.objective["k"]
            )
        field = "avg" if method.length_normalised else "sum"
        stats["logps"] = getattr(policy_logps, field).detach()
        result = compute_loss(method, self.objective, policy_logps, ref_logps, seq_kl, feature_mse)
        return result, stats

    def _shared_step(self, batch: dict, split: str) -> Tensor:
        result, stats = self.preference_step(batch)
        loss = result.losses.mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{split} loss is {loss.item()} for examples {batch.get('example_id')}; "
                "check the learning rate and the data (empty responses are dropped upstream)."
            )
        values = {
            "loss": result.losses.detach(),
            "rewards/chosen": result.chosen_rewards,
            "rewards/rejected": result.rejected_rewards,
            "rewards/accuracies": (result.chosen_rewards > result.rejected_rewards).float(),
            "rewards/margins": result.chosen_rewards - result.rejected_rewards,
        }
        for name in ("logps", "kl", "fmse"):
            if name in stats:
                chosen, rejected = halves(stats[name].detach())
                values[f"{name}/chosen"], values[f"{name}/rejected"] = chosen, rejected
        for name, value in values.items():
            metric = self.metrics[self._key(f"{split}/{name}")]
            metric.update(value.float())
            if split == "val":
                self.log(f"val/{name}", metric, on_epoch=True, batch_size=result.losses.shape[0])
        if split == "train":
            self._tokens_since_step += int(batch["attention_mask"].sum())
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    # --------------------------------------------------- per-optimizer-step logs
    def on_train_start(self) -> None:
        self._step_started = time.perf_counter()
        self._tokens_since_step = 0

    def on_before_optimizer_step(self, optimizer) -> None:
        """Log ``train/*`` once per optimizer step.

        The metrics aggregate every micro-batch of the step (gradient accumulation) and,
        through torchmetrics' ``compute``, every device; then they restart.
        """
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
        now = time.perf_counter()
        elapsed = max(now - self._step_started, 1e-9)
        self.log("train/tokens_per_sec", self._tokens_since_step / elapsed, on_step=True)
        self._step_started, self._tokens_since_step = now, 0

    # ------------------------------------------------------------- start-up
    def on_fit_start(self) -> None:
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
            out = forward_response_positions(self.parts, batch, positions, self.hook_module)
            activations.append(out.hooked)
        acts = torch.cat(activations)
        report = reconstruction_report(self.sae, acts.to(self.sae.W_dec.dtype))
        return {**report, "positions": acts.shape[0]}

    # ---------------------------------------------------------- optimisation
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
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

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep checkpoints to the policy: the reference and SAE are frozen inputs."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(("reference.", "sae."))]:
            del state[key]
