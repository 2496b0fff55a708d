"""The one wiring point: everything a run needs, built from its composed Hydra config.

``fpo-train``, ``fpo-cache``, the benchmark scripts and the tests all call
:func:`build_run_parts` and the ``RunParts.build_*`` methods, so the objective is
validated, the SAE checked against the model and its hook resolved exactly once::

    experiment = build_run_parts(cfg)          # objective, policy, tokenizer, SAE, hook, data
    module = experiment.build_module()          # + reference (online model or offline cache)
    trainer = experiment.build_trainer()        # + loggers, callbacks, global batch size
    trainer.fit(module, datamodule=experiment.datamodule)

Sizes come from the loaded model, not from hand-copied config keys: the random SAE reads
the model's hidden size and last layer, and ``check_sae_fits_model`` compares ``d_in``.
"""

from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from torch import nn

from fpo.checkpoints import AtomicCheckpointIO
from fpo.errors import UserError
from fpo.module import FPOLightningModule
from fpo.objective import Objective, build_objective
from fpo.packing import packing_from_config
from fpo.reference.base import BatchReference, OnlineReference, ReferenceSource
from fpo.reference.settings import CacheSettings, cache_settings
from fpo.reference.store import attach_reference_cache
from fpo.sae import check_sae_fits_model, sae_hook_name
from fpo.settings_check import check_settings

log = logging.getLogger("fpo.builder")
REFERENCE_SOURCES = ("online", "cached")


def build_sae(sae_cfg: DictConfig, model: nn.Module) -> nn.Module:
    """Instantiate ``cfg.sae.loader``; a loader that takes a ``model`` (the random SAE) gets
    the policy, to read sizes and layers from it."""
    loader_cfg = sae_cfg.loader
    loader = get_object(loader_cfg._target_)
    if "model" in inspect.signature(loader).parameters:
        return instantiate(loader_cfg, model=model)
    return instantiate(loader_cfg)


def check_reference_dtype(cfg: DictConfig, objective: Objective, policy: nn.Module) -> None:
    """Refuse an online reference whose ``reference.dtype`` differs from the policy's where
    that is wrong, not merely cheaper:

    - FPO's feature term: a bf16 copy of an fp32 policy (even under the same bf16 autocast)
      puts the two residual streams in different precisions, and ``D`` is ~10^3 at step 0
      where it should be ~0 (docs/bf16_features.md);
    - ``trainer=fsdp``: FSDP flattens the reference's embeddings with the policy's root
      parameters, which needs one dtype.
    """
    wanted = getattr(torch, cfg.reference.dtype)
    own = next(policy.parameters()).dtype
    if wanted == own:
        return
    why = None
    if objective.needs.features:
        why = (
            "the feature term compares policy and reference SAE features, and a reference in "
            "another precision than the policy gives a spurious D of ~10^3 at step 0 "
            "(docs/bf16_features.md)"
        )
    elif "fsdp" in str((cfg.trainer.get("strategy") or {}).get("_target_", "")):
        why = "FSDP flattens the reference's parameters with the policy's, which needs one dtype"
    if why:
        raise UserError(
            f"reference.dtype={cfg.reference.dtype} but the policy is {own}: {why}. Set "
            "reference.dtype=null (the policy's dtype) or use reference=cached."
        )


@dataclass
class RunParts:
    """A run's parts, built once (see the module docstring).

    Attributes:
        cfg: the composed config (``train.yaml`` or ``cache.yaml``).
        objective: the validated objective.
        policy, tokenizer: from ``cfg.model.loader`` (the policy's initial weights are the
            reference's).
        sae: the frozen SAE when the objective's feature term is on, else ``None``.
        hook_name: the SAE's hook (``sae_hook_name``), resolved once; ``None`` without SAE.
        datamodule: the ``PreferenceDataModule`` of ``cfg.data``.
    """

    cfg: DictConfig
    objective: Objective
    policy: nn.Module
    tokenizer: Any
    sae: nn.Module | None
    hook_name: str | None
    datamodule: Any

    @property
    def cached_reference(self) -> bool:
        return self.cfg.reference.source == "cached"

    def cache_settings(self) -> CacheSettings:
        """Where this run's offline reference cache lives and what it is tied to."""
        return cache_settings(self.cfg, k=self.objective.feature_k, hook_name=self.hook_name)

    def build_reference(self) -> ReferenceSource | None:
        """The reference named by ``reference.source`` (``None`` when nothing needs one).

        ``cached``: open and verify the offline cache of every split (fingerprint computed
        from the policy *before* training) and join the data module's datasets to it by
        example id; no reference model is built. ``online``: a frozen copy of the policy.
        """
        if not self.objective.needs.reference:
            return None
        if self.cached_reference:
            settings = self.cache_settings()
            caches = attach_reference_cache(settings, self.datamodule, self.policy, self.sae)
            sizes = ", ".join(f"{split} {len(cache)} pairs" for split, cache in caches.items())
            log.info("reference: offline cache %s (%s); no reference model", settings.root, sizes)
            return BatchReference()
        reference_model = copy.deepcopy(self.policy)
        if self.cfg.reference.get("dtype"):
            check_reference_dtype(self.cfg, self.objective, self.policy)
            reference_model.to(getattr(torch, self.cfg.reference.dtype))
        return OnlineReference(
            reference_model,
            sae=self.sae,
            hook_name=self.hook_name,
            k=self.objective.feature_k,
            logits_chunk_size=self.cfg.step.logits_chunk_size,
            packing=packing_from_config(self.cfg.model),
        )

    def build_module(self, reference: ReferenceSource | None = None) -> FPOLightningModule:
        """The Lightning module (and the reference, unless given), ready to train."""
        cfg = self.cfg
        if cfg.model.get("gradient_checkpointing"):
            self.policy.gradient_checkpointing_enable()
        if cfg.model.get("freeze_embeddings"):
            # Token embeddings (and a tied LM head) stay fixed: for a 262k vocabulary this
            # removes most of the optimizer state and the head's weight gradient.
            self.policy.get_input_embeddings().requires_grad_(False)
            self.policy.get_output_embeddings().requires_grad_(False)
        return FPOLightningModule(
            self.policy,
            objective=self.objective,
            optimizer=instantiate(cfg.optimizer),
            scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
            reference=reference if reference is not None else self.build_reference(),
            sae=self.sae,
            hook_name=self.hook_name,
            logits_chunk_size=cfg.step.logits_chunk_size,
            checkpoint_logits=cfg.step.checkpoint_logits,
            nonfinite=cfg.step.nonfinite,
            packing=packing_from_config(cfg.model),
        )

    def build_loggers(self) -> list:
        return instantiate_all(self.cfg.get("logger"))

    def build_trainer(self, loggers: list | None = None, **overrides: Any) -> L.Trainer:
        """``cfg.trainer`` with the run's callbacks, the given loggers and gradient
        accumulation set from ``step.global_batch_size``; ``overrides`` replace trainer args."""
        overrides.setdefault("logger", loggers or False)
        overrides.setdefault("callbacks", instantiate_all(self.cfg.get("callbacks")))
        if not self.cfg.trainer.get("plugins"):  # atomic writes, weights-only loads
            overrides.setdefault("plugins", [AtomicCheckpointIO()])
        trainer: L.Trainer = instantiate(self.cfg.trainer, **overrides)
        apply_global_batch_size(trainer, self.cfg)
        return trainer


def build_run_parts(cfg: DictConfig) -> RunParts:
    """Validate the objective, load the model, SAE and data; resolve the hook once."""
    check_settings(cfg)  # every numeric setting, before anything loads
    source = cfg.reference.source
    if source not in REFERENCE_SOURCES:
        raise UserError(f"reference.source={source!r}: choose online or cached.")
    objective = build_objective(cfg.objective)
    policy, tokenizer = instantiate(cfg.model.loader)
    sae = build_sae(cfg.sae, policy) if objective.needs.features else None
    objective.validate(sae=sae, cached_reference=source == "cached")
    hook_name = None
    if sae is not None:
        check_sae_fits_model(sae, policy)
        hook_name = sae_hook_name(sae)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    return RunParts(cfg, objective, policy, tokenizer, sae, hook_name, datamodule)


def apply_global_batch_size(trainer: L.Trainer, cfg: DictConfig) -> None:
    """Set gradient accumulation so per-device batch x devices x accumulation = global batch."""
    target = cfg.step.global_batch_size
    if not target:
        return
    per_step = cfg.data.batch_size * trainer.num_devices * trainer.num_nodes
    if target % per_step:
        raise UserError(
            f"step.global_batch_size={target} is not a multiple of data.batch_size="
            f"{cfg.data.batch_size} x {trainer.num_devices * trainer.num_nodes} device(s); "
            "change one of them."
        )
    trainer.accumulate_grad_batches = target // per_step
    log.info(
        "global batch %d = %d per step x %d accumulation", target, per_step, target // per_step
    )


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (loggers, callbacks)."""
    return [instantiate(c) for c in (group or {}).values() if c and "_target_" in c]
