"""The config layout a reader follows: the root holds only run-wide keys, each part has its
group or node (optimizer, scheduler, step), an objective's settings live in its preset and
the SAE's scale in the SAE's config, and the composed values of the main settings are pinned
(a change of layout must not change what runs)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

import fpo.objective  # noqa: F401  (registers the objective schema)
from fpo.commands.common import CONFIG_DIR

CONFIGS = Path(CONFIG_DIR)

#: The keys of the composed fpo-train config's root: run-wide settings and one node per
#: part. A key that serves one part (e.g. one objective's alpha, the LM-head chunk) belongs
#: in that part's node.
ROOT_KEYS = {
    "task_name", "tags", "seed", "optimized_metric", "ckpt_path", "save_policy", "sweep",
    "step", "data", "model", "objective", "sae", "reference", "trainer", "optimizer",
    "scheduler", "logger", "callbacks", "evaluation", "paths",
}  # fmt: skip

ADAMW = {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.0}
WARMUP = {"_target_": "transformers.get_constant_schedule_with_warmup", "_partial_": True}
STEP = {"logits_chunk_size": None, "checkpoint_logits": False, "nonfinite": "stop"}

#: Composed values of the main settings, as before the optimizer, scheduler and step
#: settings became groups/a node (``step``) and FPO's alpha moved to the SAE config.
PINNED = {
    (): {
        "optimizer": {**ADAMW, "lr": 5e-7},
        "scheduler": {**WARMUP, "num_warmup_steps": 150},
        "step": {**STEP, "global_batch_size": None},
        "objective.constraints.features.alpha": 0.5,
        "reference.dtype": None,
    },
    ("experiment=smoke",): {
        "optimizer": {**ADAMW, "lr": 1e-3},
        "scheduler": {**WARMUP, "num_warmup_steps": 0},
        "step": {**STEP, "global_batch_size": None},
        "objective.constraints.features.alpha": 0.5,
        "trainer.max_epochs": 2,
    },
    ("experiment=sentiment_gemma3",): {
        "optimizer": {**ADAMW, "lr": 1e-5},
        "scheduler": {**WARMUP, "num_warmup_steps": 5},
        "step": {**STEP, "global_batch_size": 8, "logits_chunk_size": 256},
        "objective.constraints.features.alpha": 1e-4,
        "trainer.precision": "32-true",
    },
    ("experiment=sentiment_gemma3", "objective=dpo"): {
        "objective.constraints.features.alpha": 0.0,
    },
    ("experiment=comparison/frontier_fpo",): {
        "optimizer": {**ADAMW, "lr": 1e-5, "foreach": True},
        "step": {**STEP, "global_batch_size": 8, "logits_chunk_size": 256},
        "objective.constraints.features.alpha": 1e-4,
    },
    ("experiment=gemma2_2b_ultrafeedback", "objective=dpo"): {
        "optimizer": {**ADAMW, "lr": 5e-7},
        "scheduler": {**WARMUP, "num_warmup_steps": 150},
        "step": {**STEP, "global_batch_size": 32, "logits_chunk_size": 1024},
        "objective.constraints.features.alpha": 0.0,
        "reference.dtype": "bfloat16",
        "trainer.precision": "bf16-mixed",
    },
    ("experiment=gemma2_2b_ultrafeedback", "objective=fpo", "reference.dtype=null"): {
        "step": {**STEP, "global_batch_size": 32, "logits_chunk_size": 1024},
        "objective.constraints.features.alpha": 0.5,
        "reference.dtype": None,
    },
    ("experiment=gemma2_9b_ultrafeedback", "objective=fpo"): {
        "optimizer": {**ADAMW, "lr": 5e-7},
        "step": {**STEP, "global_batch_size": 32, "logits_chunk_size": 1024},
        "objective.constraints.features.alpha": 0.5,
        "reference.dtype": None,
    },
}


def compose_train(*overrides: str, hydra: bool = False):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=hydra)


@pytest.mark.parametrize("overrides", list(PINNED), ids=lambda o: " ".join(o) or "defaults")
def test_main_settings_compose_to_their_pinned_values(overrides):
    cfg = compose_train(*overrides)
    for key, value in PINNED[overrides].items():
        node = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        assert got == value, key


@pytest.mark.parametrize("config_name", ["train", "cache", "eval"])
def test_the_root_holds_only_run_wide_keys(config_name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=["experiment=sentiment_gemma3"])
    own = {"cache": {"cache"}, "eval": {"run_dir", "out_dir", "device"}}.get(config_name, set())
    assert set(cfg) == ROOT_KEYS | own


def test_optimizer_and_scheduler_are_groups():
    choices = compose_train(hydra=True).hydra.runtime.choices
    assert (choices.optimizer, choices.scheduler) == ("adamw", "constant_with_warmup")
    assert "scheduler" not in compose_train("~scheduler")  # a constant lr from step 1


def test_fpo_alpha_is_the_sae_configs_feature_alpha():
    """Each SAE config states the feature-term alpha that suits its scale; only objective=fpo
    reads it, and the SAE loader never sees it."""
    for path in sorted((CONFIGS / "sae").glob("*.yaml")):
        cfg = compose_train(f"sae={path.stem}")
        assert set(cfg.sae) == {"feature_alpha", "loader"}, path.name
        assert cfg.objective.constraints.features.alpha == cfg.sae.feature_alpha, path.name
        assert "_target_" in cfg.sae.loader, path.name
        for objective in ("dpo", "simpo", "tdpo1", "tdpo2"):
            other = compose_train(f"sae={path.stem}", f"objective={objective}").objective
            assert other.constraints.features.alpha == 0.0, (path.name, objective)


def test_the_paper_setting_is_one_experiment_for_every_objective():
    """No per-objective copies of an experiment: the objective is chosen on the command line."""
    top_level = {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}
    assert top_level == {
        "smoke",
        "sentiment_gemma3",
        "gemma2_2b_ultrafeedback",
        "gemma2_9b_ultrafeedback",
    }


def test_internal_configs_are_outside_every_group():
    """Files that only serve other configs (the objective schema, the shared bases of the data
    options and Optuna searches) are not in a group folder, so Hydra neither offers nor finds
    them as options (the help and refusal: tests/integration/test_cli.py)."""
    groups = [p for p in CONFIGS.rglob("*") if p.is_dir()]
    internal = [p for group in groups for p in group.glob("_*.yaml")]
    assert not internal
    assert {"data_base.yaml", "optuna_base.yaml"} <= {p.name for p in CONFIGS.glob("*.yaml")}
    stored = ConfigStore.instance().repo
    assert "objective_schema.yaml" in stored
    assert "schema.yaml" not in stored.get("objective", {})
