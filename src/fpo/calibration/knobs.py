"""The strength knob each objective is calibrated on (``configs/calibration_knobs.yaml``, or
``--knob``), the metrics a calibration run is read by, and one calibration's plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from fpo.commands.common import CONFIG_DIR
from fpo.errors import UserError

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
