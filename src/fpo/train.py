"""``fpo-train``: compose the Hydra config, build everything, fit, return the metric."""

from __future__ import annotations

import copy
import json
import logging
import os
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fpo.cli import user_errors
from fpo.errors import UserError
from fpo.methods import Method, get_method
from fpo.module import FPOLightningModule
from fpo.reference.attach import attach_reference_cache
from fpo.reference.base import BatchReference, OnlineReference
from fpo.reference.settings import cache_settings
from fpo.sae import sae_hook_name

log = logging.getLogger("fpo.train")
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def build_reference(cfg: DictConfig, method: Method, policy, sae, datamodule):
    """The reference source named by ``reference.source`` (``None`` for SimPO).

    ``cached``: open and verify the offline cache of every split (fingerprint computed from
    the policy *before* training), join the data module's datasets to it by example id,
    and read the values from the batch; no reference model is built.
    """
    if not method.reference:
        return None
    source = cfg.reference.source
    k = int(cfg.objective.k) if method.features else 0
    hook_name = (cfg.get("hook_name") or sae_hook_name(sae)) if sae is not None else None
    if source == "online":
        return OnlineReference(
            copy.deepcopy(policy),
            sae=sae,
            hook_name=hook_name,
            k=k,
            logits_chunk_size=cfg.logits_chunk_size,
        )
    if source == "cached":
        if method.token_kl:
            raise UserError(
                f"objective={method.name} needs the reference's full-vocabulary logits every "
                "step; the offline cache cannot provide them. Use reference=online."
            )
        settings = cache_settings(cfg, k=k, hook_name=hook_name)
        caches = attach_reference_cache(settings, datamodule, policy, sae)
        sizes = ", ".join(f"{split} {len(cache)} pairs" for split, cache in caches.items())
        log.info("reference: offline cache %s (%s); no reference model", settings.root, sizes)
        return BatchReference()
    raise UserError(f"reference.source={source!r}: choose online or cached.")


def apply_global_batch_size(trainer: L.Trainer, cfg: DictConfig) -> None:
    """Set gradient accumulation so per-device batch x devices x accumulation = global batch."""
    target = cfg.get("global_batch_size")
    if not target:
        return
    per_step = cfg.data.batch_size * trainer.num_devices * trainer.num_nodes
    if target % per_step:
        raise UserError(
            f"global_batch_size={target} is not a multiple of data.batch_size={cfg.data.batch_size}"
            f" x {trainer.num_devices * trainer.num_nodes} device(s); change one of them."
        )
    trainer.accumulate_grad_batches = target // per_step
    log.info(
        "global batch %d = %d per step x %d accumulation", target, per_step, target // per_step
    )


def instantiate_all(group: DictConfig | None) -> list:
    """Instantiate every entry of a dict-of-configs group (loggers, callbacks)."""
    return [instantiate(c) for c in (group or {}).values() if c and "_target_" in c]


def evaluate(cfg: DictConfig, policy, tokenizer, loggers: list) -> dict[str, float]:
    """Sample and judge the trained policy against a fresh load of the initial weights."""
    from fpo.evaluation.after_fit import evaluate_after_fit

    result = evaluate_after_fit(
        policy,
        tokenizer,
        load_reference=lambda: instantiate(cfg.model.loader)[0],
        output_dir=cfg.paths.output_dir,
        **OmegaConf.to_container(cfg.evaluation, resolve=True),
    )
    scalars = {f"eval/{k}": float(v) for k, v in result.items() if isinstance(v, int | float)}
    for logger in loggers:
        logger.log_metrics(scalars)
    return scalars


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one run; returns the final callback metrics as floats."""
    L.seed_everything(cfg.seed, workers=True)
    method = get_method(cfg.objective)
    policy, tokenizer = instantiate(cfg.model.loader)
    if cfg.model.get("gradient_checkpointing"):
        policy.gradient_checkpointing_enable()
    if cfg.model.get("freeze_embeddings"):
        # Token embeddings (and a tied LM head) stay fixed: for a 262k vocabulary this
        # removes most of the optimizer state and the head's weight gradient.
        policy.get_input_embeddings().requires_grad_(False)
        policy.get_output_embeddings().requires_grad_(False)
    sae = instantiate(cfg.sae) if method.features else None
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    reference = build_reference(cfg, method, policy, sae, datamodule)
    module = FPOLightningModule(
        policy,
        objective=OmegaConf.to_container(cfg.objective, resolve=True),
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        reference=reference,
        sae=sae,
        hook_name=cfg.get("hook_name"),
        logits_chunk_size=cfg.logits_chunk_size,
        checkpoint_logits=cfg.checkpoint_logits,
    )
    loggers = instantiate_all(cfg.get("logger"))
    trainer: L.Trainer = instantiate(
        cfg.trainer, logger=loggers or False, callbacks=instantiate_all(cfg.get("callbacks"))
    )
    apply_global_batch_size(trainer, cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.get("evaluation") and trainer.is_global_zero:
        metrics.update(evaluate(cfg, policy, tokenizer, loggers))
    if trainer.is_global_zero:
        output_dir = Path(cfg.paths.output_dir)
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        log.info("final metrics written to %s", output_dir / "metrics.json")
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The frozen reference and SAE stay in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found .* module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    torch.set_float32_matmul_precision("high")
    with user_errors():
        metrics = train(cfg)
        name = cfg.get("optimized_metric")
        if name and name not in metrics:
            raise UserError(
                f"optimized_metric={name!r} was not logged; logged metrics: {sorted(metrics)}."
            )
        return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
