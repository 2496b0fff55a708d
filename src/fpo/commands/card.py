"""The one place a run's composed config becomes model-card values (`fpo.model_card`).

``fpo-train`` calls :func:`card_values` after fit, with the run's parts and the trainer: the
objective, SAE hook and pair counts come from what was built, the step count, global batch
and precision from the trainer that ran, the command from Hydra's saved overrides.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig

from fpo.model_card import CardValues, DataValues, TrainingValues, hub_id

#: Loader keys that may name the base model on the hub (``fpo.models.hf`` and the like).
BASE_MODEL_KEYS = ("name_or_path", "pretrained_model_name_or_path", "path")


def card_values(cfg: DictConfig, experiment: Any, trainer: Any) -> CardValues:
    """Card values of a finished fit: ``experiment`` is the run's `fpo.builder.RunParts`,
    ``trainer`` the Lightning trainer after ``fit``."""
    data, optimizer, scheduler = experiment.datamodule, cfg.optimizer, cfg.get("scheduler")
    has_val = "val" in data.splits
    per_step = data.batch_size * trainer.world_size * trainer.accumulate_grad_batches
    validation = {
        key: float(value)
        for key, value in trainer.callback_metrics.items()
        if key.startswith("val/") and value.numel() == 1
    }
    return CardValues(
        objective=experiment.objective,
        model=str(cfg.model.name),
        base_model=base_model(cfg.model),
        training=TrainingValues(
            optimizer=_short(optimizer._target_),
            learning_rate=optimizer.get("lr"),
            weight_decay=optimizer.get("weight_decay"),
            scheduler=_short(scheduler._target_) if scheduler else None,
            warmup_steps=scheduler.get("num_warmup_steps") if scheduler else None,
            global_batch_size=per_step,
            epochs=int(trainer.current_epoch),
            steps=int(trainer.global_step),
            precision=str(trainer.precision),
            seed=int(cfg.seed),
            reference=str(cfg.reference.source),
            sae=sae_label(cfg.sae.loader) if experiment.sae is not None else None,
            hook=experiment.hook_name,
        ),
        data=DataValues(
            train_source=str(cfg.data.train_source),
            train_split=str(cfg.data.get("train_split", "train")),
            train_pairs=len(data.dataset("train", wrapped=False)),
            val_source=str(cfg.data.val_source) if has_val else None,
            val_split=str(cfg.data.get("val_split", "train")) if has_val else None,
            val_pairs=len(data.dataset("val", wrapped=False)) if has_val else None,
            subset=cfg.data.get("subset"),
            format=str(cfg.data.get("format", "auto")),
            max_length=cfg.data.get("max_length"),
            max_prompt_length=cfg.data.get("max_prompt_length"),
        ),
        command=saved_command(Path(cfg.paths.output_dir)),
        validation=validation,
    )


def _short(target: str) -> str:
    """``torch.optim.AdamW`` -> ``AdamW``."""
    return str(target).rsplit(".", 1)[-1]


def base_model(model_cfg: DictConfig) -> str | None:
    """``model.base_model`` when set, else the loader's hub name (a local path is no base
    model the hub can link to)."""
    if model_cfg.get("base_model"):
        return str(model_cfg.base_model)
    loader = model_cfg.get("loader") or {}
    names = (loader.get(key) for key in BASE_MODEL_KEYS)
    return next((hub_id(str(name)) for name in names if name and hub_id(str(name))), None)


def sae_label(loader: DictConfig) -> str:
    """A hub SAE as ``release/sae_id``, a local one by its folder name, else its builder."""
    if loader.get("release"):
        return f"{loader.release}/{loader.get('sae_id', '')}".rstrip("/")
    if loader.get("path"):
        return Path(str(loader.path)).name
    return _short(loader._target_)


def saved_command(output_dir: Path) -> str | None:
    """``fpo-train OVERRIDES`` from Hydra's ``<run>/.hydra/overrides.yaml`` (``None``
    without one: a run not started by Hydra)."""
    path = output_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return None
    overrides = yaml.safe_load(path.read_text()) or []
    return " ".join(["fpo-train", *(shlex.quote(str(item)) for item in overrides)])
