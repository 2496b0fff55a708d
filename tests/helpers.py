"""Helpers shared by the tests (importable as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from fpo.objective import Objective, build_objective
from fpo.train import CONFIG_DIR

PRESETS = ("dpo", "simpo", "tdpo1", "tdpo2", "fpo")


def compose_train(*overrides: str):
    """The config ``fpo-train OVERRIDES`` composes (no Hydra run)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def preset(name: str, *overrides: str) -> Objective:
    """The objective exactly as ``fpo-train objective=NAME OVERRIDES`` composes it."""
    return build_objective(compose_train(f"objective={name}", *overrides).objective)
