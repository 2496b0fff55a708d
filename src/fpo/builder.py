"""The one builder: every part of a run is constructed here, from its composed Hydra config.

This module and the entry points (``fpo.commands``) are the only code that reads the Hydra
config; what they call receives typed values. Each part has exactly one constructor here
(objective, policy, SAE and hook, reference, module, step settings, trainer, loggers,
evaluation inputs). ``fpo-train`` calls :func:`build_training`::

    parts = build_run_parts(cfg)          # objective, policy, tokenizer, SAE, hook, data
    module = parts.build_module()         # + reference (online model or offline cache)
    trainer = parts.build_trainer(parts.build_loggers())

Sizes come from the loaded model (the random SAE reads its hidden size and last layer).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fpo.checkpoints import AtomicCheckpointIO
from fpo.errors import UserError
from fpo.fit_clock import FitClock
from fpo.lora import AdapterFreeReference, add_adapters, is_lora, lora_settings
from fpo.module import FPOLightningModule
from fpo.objective import Objective, build_objective
from fpo.packing import Packing
from fpo.reference.base import BatchReference, OnlineReference, ReferenceSource
from fpo.reference.settings import CacheSettings, cache_settings
from fpo.reference.store import attach_reference_cache
from fpo.sae import check_sae_fits_model, sae_hook_name
from fpo.settings_check import check_settings

if TYPE_CHECKING:
    from fpo.evaluation.after_fit import EvaluationInputs

log = logging.getLogger("fpo.builder")
REFERENCE_SOURCES = ("online", "cached")


# ------------------------------------------------------------------ typed parts
@dataclass(frozen=True)
class StepSettings:
    """A training step's LM-head chunk, logits recompute, non-finite policy and packing."""

    logits_chunk_size: int | None = None
    checkpoint_logits: bool = False
    nonfinite: str = "stop"
    packing: Packing | None = None


def frozen_copy(policy: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of ``policy``'s current weights (the reference), cast to ``dtype`` if given."""
    model = copy.deepcopy(policy)
    return model.to(dtype) if dtype is not None else model


def online_reference(
    model: nn.Module,
    objective: Objective,
    *,
    sae: nn.Module | None = None,
    hook_name: str | None = None,
    logits_chunk_size: int | None = None,
    packing: Packing | None = None,
) -> OnlineReference:
    """``objective``'s online reference run on ``model`` as given (a :func:`frozen_copy` of the
    policy; fpo-cache: the untrained policy; a LoRA policy: itself, adapters off), with the
    top ``feature_k`` pooled features of ``sae`` at ``hook_name`` when the feature term is on."""
    features = objective.needs.features
    settings = dict(sae=sae if features else None, hook_name=hook_name if features else None)
    settings |= dict(k=objective.feature_k, logits_chunk_size=logits_chunk_size, packing=packing)
    if is_lora(model):
        return AdapterFreeReference(model, **settings)
    return OnlineReference(model, **settings)


def assemble_module(
    policy: nn.Module,
    objective: Objective,
    optimizer: Callable,
    *,
    scheduler: Callable | None = None,
    reference: ReferenceSource | None = None,
    sae: nn.Module | None = None,
    hook_name: str | None = None,
    step: StepSettings | None = None,
    sae_report_batches: int = 2,
) -> FPOLightningModule:
    """The Lightning module of a validated ``objective`` (arguments: `FPOLightningModule`);
    the SAE and hook are kept only when the feature term is on."""
    features, step = objective.needs.features, step or StepSettings()
    return FPOLightningModule(
        policy,
        objective=objective,
        optimizer=optimizer,
        scheduler=scheduler,
        reference=reference,
        sae=sae if features else None,
        hook_name=hook_name if features else None,
        logits_chunk_size=step.logits_chunk_size,
        checkpoint_logits=step.checkpoint_logits,
        sae_report_batches=sae_report_batches,
        nonfinite=step.nonfinite,
        packing=step.packing,
    )


def check_reference_dtype(
    dtype: torch.dtype, objective: Objective, policy: nn.Module, *, fsdp: bool
) -> None:
    """Refuse an online reference in ``dtype`` (``reference.dtype``) other than the policy's
    where that is wrong, not merely cheaper: with FPO's feature term (a bf16 copy of an fp32
    policy gives ``D`` ~10^3 at step 0, docs/bf16_features.md) and under ``fsdp`` (FSDP
    flattens the reference's embeddings with the policy's root parameters: one dtype)."""
    own = next(policy.parameters()).dtype
    if dtype == own:
        return
    why = None
    if objective.needs.features:
        why = (
            "the feature term compares policy and reference SAE features, and a reference in "
            "another precision than the policy gives a spurious D of ~10^3 at step 0 "
            "(docs/bf16_features.md)"
        )
    elif fsdp:
        why = "FSDP flattens the reference's parameters with the policy's, which needs one dtype"
    elif is_lora(policy):
        why = "with model.lora the reference is the policy itself, its adapters off"
    if why:
        name = str(dtype).removeprefix("torch.")
        raise UserError(
            f"reference.dtype={name} but the policy is {own}: {why}. Set "
            "reference.dtype=null (the policy's dtype) or use reference=cached."
        )


def apply_global_batch_size(
    trainer: L.Trainer, global_batch_size: int | None, batch_size: int
) -> None:
    """Set gradient accumulation so per-device ``batch_size`` x devices x accumulation =
    ``global_batch_size`` (nothing when it is unset)."""
    if not global_batch_size:
        return
    per_step = batch_size * trainer.num_devices * trainer.num_nodes
    if global_batch_size % per_step:
        raise UserError(
            f"step.global_batch_size={global_batch_size} is not a multiple of data.batch_size="
            f"{batch_size} x {trainer.num_devices * trainer.num_nodes} device(s); change one "
            "of them."
        )
    trainer.accumulate_grad_batches = accumulation = global_batch_size // per_step
    log.info(
        "global batch %d = %d per step x %d accumulation",
        per_step * accumulation,
        per_step,
        accumulation,
    )


# ------------------------------------------------------------------ from the config
def load_model(loader: DictConfig) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` of ``cfg.model.loader``: the policy, and evaluation's second
    load of the initial weights."""
    return instantiate(loader)


def parse_objective(node: DictConfig) -> Objective:
    """``cfg.objective`` as an :class:`Objective`, checked against its schema only."""
    return build_objective(node)


def load_run_sae(sae_cfg: DictConfig, model: nn.Module) -> tuple[nn.Module, str]:
    """The frozen SAE of ``cfg.sae.loader``, checked against ``model``, and its resolved hook.
    A loader that takes a ``model`` (the random SAE) gets it, to read sizes and layers."""
    takes_model = "model" in inspect.signature(get_object(sae_cfg.loader._target_)).parameters
    sae = instantiate(sae_cfg.loader, **({"model": model} if takes_model else {}))
    check_sae_fits_model(sae, model)
    return sae.requires_grad_(False).eval(), sae_hook_name(sae)


def step_settings(cfg: DictConfig) -> StepSettings:
    """The run's :class:`StepSettings` (``cfg.step`` and ``model.packed``/``pack_length``)."""
    packing = Packing(cfg.model.get("pack_length")) if cfg.model.get("packed", False) else None
    return StepSettings(
        logits_chunk_size=cfg.step.logits_chunk_size,
        checkpoint_logits=bool(cfg.step.checkpoint_logits),
        nonfinite=cfg.step.nonfinite,
        packing=packing,
    )


def instantiate_all(group: DictConfig | dict | None) -> list:
    """Instantiate every entry of a dict-of-configs group (loggers, callbacks)."""
    return [instantiate(c) for c in (group or {}).values() if c and "_target_" in c]


@dataclass
class RunParts:
    """A run's parts, built once by :func:`build_run_parts`: the composed ``cfg`` (read
    only by these methods), the validated objective, the policy (its initial weights are
    the reference's) and tokenizer, the frozen SAE and its resolved hook (``None`` unless
    the feature term is on) and the ``PreferenceDataModule`` of ``cfg.data``."""

    cfg: DictConfig
    objective: Objective
    policy: nn.Module
    tokenizer: Any
    sae: nn.Module | None
    hook_name: str | None
    datamodule: Any

    @property
    def step(self) -> StepSettings:
        return step_settings(self.cfg)

    def cache_settings(self) -> CacheSettings:
        """Where this run's offline reference cache lives and what it is tied to."""
        reference = self.cfg.reference
        try:
            root = Path(str(reference.path)).expanduser()
        except OmegaConfBaseException as err:
            raise UserError(
                f"reference.path cannot be resolved outside a Hydra run ({err}); set "
                "reference.path=FOLDER explicitly."
            ) from err
        return cache_settings(
            root,
            k=self.objective.feature_k,
            hook_name=self.hook_name,
            values_dtype=reference.get("values_dtype", "float32"),
            precision=str(self.cfg.trainer.get("precision", "32-true")),
        )

    def build_reference(self) -> ReferenceSource | None:
        """The reference named by ``reference.source`` (``None`` when nothing needs one).
        ``cached``: the offline cache of every split, verified against the policy *before*
        training and joined to the data by example id; no reference model. ``online``: a
        frozen copy of the policy (in ``reference.dtype`` if set)."""
        if not self.objective.needs.reference:
            return None
        if self.cfg.reference.source == "cached":
            settings = self.cache_settings()
            caches = attach_reference_cache(settings, self.datamodule, self.policy, self.sae)
            sizes = ", ".join(f"{split} {len(cache)} pairs" for split, cache in caches.items())
            log.info("reference: offline cache %s (%s); no reference model", settings.root, sizes)
            return BatchReference()
        dtype = None
        if self.cfg.reference.get("dtype"):
            dtype = getattr(torch, self.cfg.reference.dtype)
            strategy = str((self.cfg.trainer.get("strategy") or {}).get("_target_", ""))
            check_reference_dtype(dtype, self.objective, self.policy, fsdp="fsdp" in strategy)
        step, policy = self.step, self.policy
        return online_reference(
            policy if is_lora(policy) else frozen_copy(policy, dtype),
            self.objective,
            sae=self.sae,
            hook_name=self.hook_name,
            logits_chunk_size=step.logits_chunk_size,
            packing=step.packing,
        )

    def cache_reference(self) -> OnlineReference:
        """fpo-cache's reference: the untrained policy itself (nothing trains), padded (the
        cache's values do not depend on packing, which is no part of its fingerprint)."""
        return online_reference(
            self.policy,
            self.objective,
            sae=self.sae,
            hook_name=self.hook_name,
            logits_chunk_size=self.step.logits_chunk_size,
        )

    def build_module(self, reference: ReferenceSource | None = None) -> FPOLightningModule:
        """The Lightning module (and the reference, unless given), ready to train."""
        cfg = self.cfg
        if cfg.model.get("gradient_checkpointing"):
            self.policy.gradient_checkpointing_enable()
        if cfg.model.get("freeze_embeddings"):
            # Frozen token embeddings (and tied head): no optimizer state for a 262k vocabulary
            self.policy.get_input_embeddings().requires_grad_(False)
            self.policy.get_output_embeddings().requires_grad_(False)
        optimizer = instantiate(cfg.optimizer)
        scheduler = cfg.get("scheduler") or {}  # `~scheduler` leaves an experiment's values
        scheduler = instantiate(scheduler) if "_target_" in scheduler else None
        return assemble_module(
            self.policy,
            self.objective,
            optimizer,
            scheduler=scheduler,
            reference=reference if reference is not None else self.build_reference(),
            sae=self.sae,
            hook_name=self.hook_name,
            step=self.step,
        )

    def build_loggers(
        self, save_dir: Path | None = None, wandb_job_type: str | None = None, group: str = ""
    ) -> list:
        """``cfg.logger``; with ``save_dir`` every logger that writes files writes there, and
        a W&B logger gets ``wandb_job_type`` and, unless it names one, the W&B ``group``."""
        if save_dir is None and wandb_job_type is None:
            return instantiate_all(self.cfg.get("logger"))
        loggers = OmegaConf.to_container(self.cfg.get("logger") or {}, resolve=True)
        for spec in loggers.values():
            if isinstance(spec, dict) and "save_dir" in spec and save_dir is not None:
                spec["save_dir"] = str(save_dir)
            if isinstance(spec, dict) and spec.get("_target_", "").endswith("wandb_logger"):
                if wandb_job_type:
                    spec["job_type"] = wandb_job_type
                if group:
                    spec["group"] = spec.get("group") or group
        return instantiate_all(OmegaConf.create(loggers))

    def build_trainer(self, loggers: list | None = None, **overrides: Any) -> L.Trainer:
        """``cfg.trainer`` with the run's callbacks and a `FitClock`, the given loggers and
        accumulation set from ``step.global_batch_size``; ``overrides`` replace trainer args."""
        overrides.setdefault("logger", loggers or False)
        overrides.setdefault("callbacks", [*instantiate_all(self.cfg.get("callbacks")), FitClock()])
        if not self.cfg.trainer.get("plugins"):  # atomic writes, weights-only loads
            overrides.setdefault("plugins", [AtomicCheckpointIO()])
        trainer: L.Trainer = instantiate(self.cfg.trainer, **overrides)
        batch_size = self.cfg.data.batch_size
        apply_global_batch_size(trainer, self.cfg.step.global_batch_size, batch_size)
        return trainer

    def load_reference_model(self) -> nn.Module:
        """A fresh load of the initial weights (evaluation's reference, after training)."""
        return load_model(self.cfg.model.loader)[0]

    def evaluation_inputs(self, out_dir: Path | None = None) -> EvaluationInputs:
        """`fpo.evaluation.after_fit.evaluate_run`'s inputs: files under ``out_dir`` (default
        ``<output_dir>/evaluation``); the run's SAE, loaded here if training had none
        (feature drift is measured for every objective)."""
        from fpo.evaluation.after_fit import EvaluationInputs, heldout_pairs_file

        settings = OmegaConf.to_container(self.cfg.evaluation, resolve=True)
        sae, hook_name, sae_cfg = self.sae, self.hook_name, self.cfg.get("sae")
        if sae is None and sae_cfg and heldout_pairs_file(settings):
            sae, hook_name = load_run_sae(sae_cfg, self.policy)
        loader = sae_cfg.loader if sae_cfg else {}
        label = loader.get("path") or loader.get("sae_id") or loader.get("_target_")
        return EvaluationInputs(
            settings=settings,
            out_dir=Path(out_dir or Path(self.cfg.paths.output_dir) / "evaluation"),
            tokenizer=self.tokenizer,
            datamodule=self.datamodule,
            objective=self.objective,
            sae=sae,
            hook_name=hook_name,
            sae_label=label,
            packing=self.step.packing,
        )


def build_run_parts(cfg: DictConfig) -> RunParts:
    """Validate the objective, load the model, SAE and data; resolve the hook once."""
    check_settings(cfg)  # every numeric setting, before anything loads
    source = cfg.reference.source
    if source not in REFERENCE_SOURCES:
        raise UserError(f"reference.source={source!r}: choose online or cached.")
    objective = parse_objective(cfg.objective)
    policy, tokenizer = load_model(cfg.model.loader)
    sae = hook_name = None
    if objective.needs.features and cfg.get("sae"):  # no SAE: validate() names the key
        sae, hook_name = load_run_sae(cfg.sae, policy)
    if lora := lora_settings(cfg.model.get("lora")):  # the reference: adapters off
        policy = add_adapters(policy, lora)
    objective.validate(sae=sae, cached_reference=source == "cached")
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    return RunParts(cfg, objective, policy, tokenizer, sae, hook_name, datamodule)


@dataclass
class Training:
    """``fpo-train``'s parts: the run's parts, the module, its loggers and trainer."""

    parts: RunParts
    module: FPOLightningModule
    loggers: list
    trainer: L.Trainer


def build_training(cfg: DictConfig) -> Training:
    """Everything ``fpo-train`` fits, built in the order of the module docstring."""
    parts = build_run_parts(cfg)
    module = parts.build_module()
    loggers = parts.build_loggers()
    return Training(parts, module, loggers, parts.build_trainer(loggers))
