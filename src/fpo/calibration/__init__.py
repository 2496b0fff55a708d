"""Matched-KL calibration: the knob value of an objective that lands its validation
KL(policy || reference) at a target (``fpo-calibrate``).

- `fpo.calibration.search`: the search alone (:func:`calibrate` over any measure function);
- `fpo.calibration.knobs`: the knob (``configs/calibration_knobs.yaml`` or ``--knob``), its
  range and the runs' folder, checked on the composed config;
- `fpo.calibration.runs`: one resumable ``fpo-train`` job per knob value, read back;
- `fpo.calibration.report`: ``calibration.json`` and ``calibration.md``.
"""

from fpo.calibration.knobs import Knob, Plan, load_knobs
from fpo.calibration.runs import Point, Runner
from fpo.calibration.search import (
    Calibration,
    Status,
    TargetCalibration,
    Tolerance,
    calibrate,
    calibrate_target,
)

__all__ = [
    "Calibration",
    "Knob",
    "Plan",
    "Point",
    "Runner",
    "Status",
    "TargetCalibration",
    "Tolerance",
    "calibrate",
    "calibrate_target",
    "load_knobs",
]
