"""Configs and data exactly as the command line composes them, without a Hydra run."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from fpo.builder import parse_objective
from fpo.commands.common import CONFIG_DIR
from fpo.data import PreferenceDataModule
from fpo.objective import Objective

#: The objective presets of ``configs/objective/``.
PRESETS = ("dpo", "simpo", "tdpo1", "tdpo2", "fpo")

#: Trainer arguments of a test's training run: no logger, checkpoints, bars or validation.
QUIET_TRAINER = dict(
    logger=False,
    limit_val_batches=0,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)


def compose_train(*overrides: str) -> DictConfig:
    """The config ``fpo-train OVERRIDES`` composes (no Hydra run)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def preset(name: str, *overrides: str) -> Objective:
    """The objective exactly as ``fpo-train objective=NAME OVERRIDES`` composes it."""
    return parse_objective(compose_train(f"objective={name}", *overrides).objective)


def fixture_datamodule(
    tokenizer, fixtures_dir, batch_size=2, eval_batch_size=4, shuffle=True
) -> PreferenceDataModule:
    """The eight UltraFeedback fixture pairs of ``fixtures_dir`` as train and val splits
    (max length 128)."""
    path = str(Path(fixtures_dir) / "ultrafeedback_binarized.jsonl")
    return PreferenceDataModule(
        train_source=path,
        val_source=path,
        tokenizer=tokenizer,
        max_length=128,
        max_prompt_length=64,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        shuffle=shuffle,
    )
