"""What one ``fpo-calibrate`` command calibrates, read from the composed training config: the
objective's knob (`fpo.calibration.knobs`), its search range and the folder of its runs,
all checked before any run starts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

import fpo.objective  # noqa: F401  (registers objective/schema, which the presets extend)
from fpo.calibration.knobs import KNOBS_FILE, SPAN, Plan, choose_knob, load_knobs
from fpo.calibration.runs import series_folder
from fpo.calibration.search import round_knob
from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError


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
    series_dir = series_folder(log_dir, str(cfg.task_name), objective, overrides)
    return Plan(objective, chosen, float(low), float(high), overrides, series_dir)
