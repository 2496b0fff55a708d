"""What one ``fpo-calibrate`` command calibrates: the objective's knob (from
``configs/calibration_knobs.yaml`` or ``--knob``), its search range and the folder of its runs,
all checked on the composed training config before any run starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import fpo.objective  # noqa: F401  (registers objective/schema, which the presets extend)
from fpo.calibration.search import round_knob
from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError
from fpo.sweep import derive_sweep_name

KNOBS_FILE = Path(CONFIG_DIR) / "calibration_knobs.yaml"
#: Without --low/--high the range is the knob's configured value divided and multiplied by this.
SPAN = 10.0
#: Where a run's validation KL and score are (``evaluation.validation.prompts_file``).
VAL_KL = "val/sampled/kl"
VAL_SCORE = "val/sampled/policy_judge_mean"


@dataclass(frozen=True)
class Knob:
    """A config key that sets an objective's strength, and whether raising it raises KL
    (``None``: not stated, e.g. a ``--knob`` the map does not list for this objective)."""

    key: str
    increases_kl: bool | None = None

    @property
    def direction(self) -> str:
        if self.increases_kl is None:
            return "direction not stated"
        return "higher -> higher KL" if self.increases_kl else "higher -> lower KL"


def load_knobs(path: Path = KNOBS_FILE) -> dict[str, Knob]:
    """``{objective name: Knob}`` from the knob map."""
    entries = yaml.safe_load(path.read_text()) or {}
    knobs = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str):
            raise UserError(f"{path}: entry {name!r} needs a `key` (a config key).")
        knobs[str(name)] = Knob(entry["key"], entry.get("increases_kl"))
    return knobs


def choose_knob(objective: str, override: str | None, knobs: dict[str, Knob]) -> Knob:
    """The knob of ``objective``: ``override`` (``--knob``) when given, else the map's."""
    mapped = knobs.get(objective)
    if override:
        return mapped if mapped and mapped.key == override else Knob(override)
    if mapped is None:
        raise UserError(
            f"objective.name={objective!r} has no strength knob in {KNOBS_FILE} (it lists "
            f"{', '.join(sorted(knobs))}): name one with --knob KEY, e.g. --knob objective.beta."
        )
    return mapped


def compose_train(overrides: list[str]) -> DictConfig:
    """The config ``fpo-train OVERRIDES`` composes, with its ``hydra`` block; a config Hydra
    cannot compose is a `UserError`."""
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"the overrides {overrides} do not compose: {error}") from None


def knob_value(cfg: DictConfig, key: str) -> Any:
    """The knob's value in the composed config; a `UserError` when the key is absent."""
    missing = object()
    try:
        value = OmegaConf.select(cfg, key, default=missing)
    except OmegaConfBaseException as error:
        raise UserError(f"knob {key}: {error}") from None
    if value is missing:
        raise UserError(f"knob {key}: no such key in the composed config (--knob KEY).")
    return value


@dataclass(frozen=True)
class Plan:
    """One calibration: the objective's knob and range, the overrides of its runs (with the
    seed, without the knob) and the folder holding one sub-folder per knob value."""

    objective: str
    knob: Knob
    low: float
    high: float
    overrides: list[str]
    series_dir: Path


def check_runnable(cfg: DictConfig) -> None:
    """Calibration reads each run's validation KL, one job per knob value."""
    validation = OmegaConf.select(cfg, "evaluation.validation.prompts_file", default=None)
    if not validation:
        raise UserError(
            "calibration reads each run's validation KL, which needs "
            "evaluation.validation.prompts_file (e.g. experiment=matched_kl/<objective>, or "
            "evaluation=sentiment evaluation.validation.prompts_file=...)."
        )
    params = OmegaConf.select(cfg, "hydra.sweeper.params", default=None)
    if params:
        raise UserError(
            f"the config sweeps hydra.sweeper.params ({dict(params)}); fpo-calibrate runs one "
            "job per knob value: use an experiment without a sweep (e.g. "
            "experiment=matched_kl/<objective>)."
        )


def make_plan(
    overrides: list[str],
    *,
    seed: int,
    knob: str | None = None,
    low: float | None = None,
    high: float | None = None,
    knobs_file: Path = KNOBS_FILE,
) -> Plan:
    """Compose ``fpo-train OVERRIDES seed=SEED``, pick the knob and the range, check both."""
    if any(o.lstrip("+~").split("=", 1)[0] == "seed" for o in overrides):
        raise UserError("give the seed as --seed N, not as an override (seed=...).")
    overrides = [*overrides, f"seed={seed}"]
    cfg = compose_train(overrides)
    check_runnable(cfg)
    objective = str(cfg.objective.name)
    chosen = choose_knob(objective, knob, load_knobs(knobs_file))
    if any(o.lstrip("+~").split("=", 1)[0] == chosen.key for o in overrides):
        raise UserError(f"{chosen.key} is the knob fpo-calibrate sets: drop it from the overrides.")
    value = knob_value(cfg, chosen.key)
    if low is None or high is None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise UserError(
                f"knob {chosen.key}={value!r} in the composed config: a default range needs a "
                "positive number; give --low and --high."
            )
        low = round_knob(value / SPAN) if low is None else low
        high = round_knob(value * SPAN) if high is None else high
    if not (0 < low < high and math.isfinite(high)):
        raise UserError(f"--low {low} --high {high}: the range needs 0 < low < high.")
    compose_train([*overrides, f"{chosen.key}={high!r}"])  # the key takes a number
    log_dir = Path(str(cfg.paths.log_dir)).resolve()
    # Like an fpo-train sweep's folder: the same command finds the same runs.
    series = derive_sweep_name(overrides)
    series_dir = log_dir / str(cfg.task_name) / "calibration" / objective / series
    return Plan(objective, chosen, float(low), float(high), overrides, series_dir)
