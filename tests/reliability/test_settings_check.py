"""Every numeric setting is checked before anything loads (``fpo.settings_check``)."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ValidationError

import fpo.builder
from fpo.builder import build_run_parts
from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError
from fpo.nonfinite import NonFiniteError
from fpo.objective import Objective
from fpo.settings_check import RULES, settings_problems
from fpo.testing import PRESETS, compose_train, run_module

#: The config nodes whose numbers are settings (``trainer.strategy``: the strategy's own).
NODES = ("objective", "optimizer", "scheduler", "step", "data", "cache", "trainer", "evaluation")
#: Null leaves of the configs that hold no number when set.
NULL_TEXT_KEYS = {"data.subset", "data.val_source", "data.cache_dir"}
NULL_TEXT_KEYS |= {f"evaluation.{split}.prompts_file" for split in ("validation", "ood_test")}
NULL_TEXT_KEYS |= {"evaluation.latest_dir", "evaluation.reference_cache_dir"}
#: Keys no shipped config sets (Lightning's and AdamW's defaults apply) that count.
INTEGER_KEYS_NOT_IN_CONFIGS = {"trainer.max_steps", "trainer.min_steps", "trainer.num_nodes"}
INTEGER_KEYS_NOT_IN_CONFIGS |= {"scheduler.num_training_steps", "data.max_train_samples"}
#: Out of range for these keys only (the generic values below are out for every key).
OUT_OF_RANGE = {
    "optimizer.betas": [[0.9, 1.0], [0.9], 0.9],
    "trainer.val_check_interval": [1.5, 0],
    "trainer.limit_val_batches": [1.5],
    "seed": [2**32],
    "objective.beta": [0.0],
    "optimizer.lr": [0.0],
    "data.batch_size": [0],
    "data.max_length": [1],
    "trainer.max_epochs": [-2],
    "trainer.devices": [0, "abc", [0, -1]],
}


def options(group: str) -> list[str]:
    return sorted(
        str(p.relative_to(Path(CONFIG_DIR) / group).with_suffix(""))
        for p in (Path(CONFIG_DIR) / group).rglob("*.yaml")
    )


def compose_all() -> list[DictConfig]:
    """``fpo-cache`` (train.yaml + cache:) with every objective preset, and ``fpo-train``
    with every option of the groups that set numbers, one group at a time."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        configs = [compose(config_name="cache", overrides=[f"objective={p}"]) for p in PRESETS]
        groups = ("experiment", "trainer", "data", "debug", "optimizer", "scheduler", "evaluation")
        for group in groups:
            configs += [compose("train", [f"{group}={name}"]) for name in options(group)]
    return configs


def numeric_leaves(node, prefix: str):
    """``(key, value)`` of every number, list of numbers and null below ``node`` (a plain
    container: interpolations stay strings)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if f"{prefix}.{key}" != "trainer.strategy":
                yield from numeric_leaves(value, f"{prefix}.{key}")
    elif isinstance(node, list):
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in node):
            yield prefix, list(node)
    elif node is None or (isinstance(node, int | float) and not isinstance(node, bool)):
        yield prefix, node


def dataclass_numbers(cls, prefix: str):
    """``(key, type)`` of every int or float field of a dataclass tree (the schema)."""
    for field in dataclasses.fields(cls):
        kind = field.default_factory if dataclasses.is_dataclass(field.default_factory) else None
        if kind is not None:
            yield from dataclass_numbers(kind, f"{prefix}.{field.name}")
        elif field.type in ("int", "float", int, float):
            yield f"{prefix}.{field.name}", field.type


@pytest.fixture(scope="module")
def composed() -> list[DictConfig]:
    return compose_all()


@pytest.fixture(scope="module")
def leaves(composed) -> dict[str, set]:
    found: dict[str, set] = {"seed": {"0"}}
    for cfg in composed:
        for node in NODES:
            plain = OmegaConf.to_container(cfg, resolve=False).get(node) or {}
            for key, value in numeric_leaves(plain, node):
                found.setdefault(key, set()).add(repr(value))
    return found


def test_every_numeric_setting_has_a_rule(leaves):
    """A new numeric key (in a config or in the objective's schema) needs a rule."""
    schema = dict(dataclass_numbers(Objective, "objective"))
    assert schema, "the walk found no numeric field of the Objective schema"
    assert {"objective.beta", "objective.constraints.features.k"} <= schema.keys()
    numeric = {key for key, values in leaves.items() if values != {"None"}}
    nulls = {key for key, values in leaves.items() if values == {"None"}} - NULL_TEXT_KEYS
    assert {"optimizer.lr", "trainer.val_check_interval", "cache.shard_size"} <= numeric
    missing = sorted((schema.keys() | numeric | nulls) - RULES.keys())
    assert not missing, f"numeric settings without a rule in fpo.settings_check.RULES: {missing}"


def test_every_shipped_config_passes(composed):
    for cfg in composed:
        assert settings_problems(cfg) == [], OmegaConf.to_yaml(cfg.get("trainer"))


@pytest.fixture(scope="module")
def base() -> DictConfig:
    return compose_train(
        "experiment=smoke", "evaluation=smoke", "+cache.shard_size=8", "+cache.batch_size=null"
    )


def bad_values(key: str, leaves: dict[str, set]) -> list:
    values = [math.nan, math.inf, -math.inf, -(10**6), "abc", True]
    integer = any(v.lstrip("-").isdigit() for v in leaves.get(key, ()))
    schema = dict(dataclass_numbers(Objective, "objective"))
    if integer or key in INTEGER_KEYS_NOT_IN_CONFIGS or schema.get(key) in ("int", int):
        values.append(2.5)
    return values + OUT_OF_RANGE.get(key, [])


@pytest.mark.parametrize("key", sorted(RULES))
def test_each_bad_value_is_refused_naming_the_key_before_anything_loads(
    key, base, leaves, monkeypatch
):
    def no_loading(*args, **kwargs):
        raise AssertionError(f"something was instantiated before {key} was checked: {args}")

    monkeypatch.setattr(fpo.builder, "instantiate", no_loading)
    for value in bad_values(key, leaves):
        cfg = copy.deepcopy(base)
        try:
            OmegaConf.update(cfg, key, value, force_add=True)
        except ValidationError as err:  # the objective's schema: refused while composing
            assert f"full_key: {key}" in str(err), (key, value, err)
            continue
        with pytest.raises(UserError) as info:
            build_run_parts(cfg)
        message, stored = str(info.value), OmegaConf.select(cfg, key)  # 0 -> 0.0 in a float
        stored = list(stored) if isinstance(stored, ListConfig) else stored
        shown = repr(stored) if isinstance(stored, str) else str(stored)
        assert f"{key}={shown}: must be " in message, (key, value, message)


def test_the_message_names_the_range():
    cfg = compose_train("optimizer.lr=-1e-5", "data.batch_size=2.0", "trainer.max_epochs=nan")
    message = "; ".join(settings_problems(cfg))
    assert "optimizer.lr=-1e-05: must be a finite number > 0" in message
    assert "data.batch_size=2.0: must be an integer >= 1" in message
    assert "trainer.max_epochs=nan: must be an integer >= -1 or null" in message


@pytest.mark.parametrize(
    ("command", "override", "expected"),
    [
        ("fpo.commands.train", "optimizer.lr=nan", "optimizer.lr=nan: must be a finite number > 0"),
        ("fpo.commands.cache", "data.batch_size=0", "data.batch_size=0: must be an integer >= 1"),
    ],
)
def test_the_command_line_refuses_a_bad_setting_in_one_paragraph(
    tmp_path, command, override, expected
):
    result = run_module(command, "experiment=smoke", f"paths.log_dir={tmp_path}", override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    error = result.stderr.split("error: ", 1)[1].strip()
    assert expected in error and "\n" not in error, result.stderr[-2000:]


# --------------------------------------- non-finite values whose cause is no row of the data


def fit_smoke(tmp_path: Path, *overrides: str, objective_beta: float | None = None):
    cfg = compose_train("experiment=smoke", f"paths.output_dir={tmp_path}", *overrides)
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    if objective_beta is not None:  # as a Python caller could, past check_settings
        module.objective.beta = objective_beta
    trainer = experiment.build_trainer(
        max_steps=3, enable_progress_bar=False, enable_model_summary=False, logger=False
    )
    trainer.fit(module, datamodule=experiment.datamodule)


def test_a_diverged_update_is_not_blamed_on_the_rows(tmp_path):
    """A finite but huge lr makes the weights infinite after one update; every later step
    fails, so the message names the weight, not the rows, and does not advise skip."""
    with pytest.raises(NonFiniteError) as err:
        fit_smoke(tmp_path, "optimizer.lr=1e39", "callbacks=none")
    message = str(err.value)
    assert "is no longer finite: an earlier update diverged" in message, message
    assert "check these rows" not in message and "optimizer.lr" in message


def test_a_nonfinite_objective_setting_is_not_blamed_on_the_rows(tmp_path):
    with pytest.raises(NonFiniteError) as err:
        fit_smoke(tmp_path, "callbacks=none", objective_beta=math.nan)
    message = str(err.value)
    assert "objective.beta=nan" in message and "check these rows" not in message, message


def test_fpo_train_checks_the_seed_before_seeding():
    """``train`` seeds before it builds the run: the seed is checked first (Lightning would
    raise its own ValueError for ``seed=nan``)."""
    from fpo.commands.train import train

    with pytest.raises(UserError, match=r"seed=nan: must be an integer in \[0, 4294967295\]"):
        train(compose_train("experiment=smoke", "seed=nan"))
