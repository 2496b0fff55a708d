"""The runs behind a calibration: one ``fpo-train`` job per knob value, in a folder named
after it, read back for its validation KL.

``<series_dir>/<knob>=<value>/run/`` is the job (``<series_dir>`` from
`fpo.commands.calibrate_plan.make_plan`:
``logs/<task>/calibration/<objective>/<overrides slug and hash>``). It
runs as a one-job ``fpo-train -m`` sweep with ``hydra.sweep.dir`` set to the value's folder,
so the sweep machinery of `fpo.sweep` applies: a job whose ``job_status.json`` says
``finished`` is read and never rerun, an interrupted one resumes from its
``checkpoints/last.ckpt`` (when the run keeps one: ``callbacks`` ``default``/``throughput``),
and a failed one runs again from the start. Each run evaluates its validation prompts only
(:data:`VALIDATION_ONLY`), and only those keys of ``metrics.json``
(:data:`~fpo.calibration.knobs.VAL_KL`, :data:`~fpo.calibration.knobs.VAL_SCORE`) are read:
no test metric is computed, let alone read, in a calibration.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fpo.calibration.knobs import VAL_KL, VAL_SCORE
from fpo.errors import UserError
from fpo.sweep import STATUS_FILE, derive_sweep_name, read_status

RUN_SUBDIR = "run"
# Each run samples its validation prompts only (no test prompts, test pairs or second test
# set): a calibration reads nothing else, and it halves the evaluation's time.
VALIDATION_ONLY = "evaluation.validation_only"


@dataclass(frozen=True)
class Point:
    """One finished run: its knob value, validation KL and score, and its folder."""

    knob: float
    val_kl: float
    val_score: float | None
    run_dir: Path

    def as_dict(self) -> dict:
        return {
            "knob": self.knob,
            "val_kl": self.val_kl,
            "val_score": self.val_score,
            "run_dir": str(self.run_dir),
        }


def series_folder(log_dir: Path, task_name: str, objective: str, overrides: list[str]) -> Path:
    """The folder of a calibration series: ``<log_dir>/<task>/calibration/<objective>/<name>``,
    the name derived like an ``fpo-train -m`` sweep's from the overrides (``seed=`` included),
    so the same command finds the same runs."""
    return Path(log_dir) / task_name / "calibration" / objective / derive_sweep_name(overrides)


def format_knob(value: float) -> str:
    """The knob value as the override and the folder name write it (``repr`` of the float:
    ``0.0001``, ``1e-05``, ``3.0``), which reads back as the same float."""
    return repr(float(value))


def read_point(knob: float, run_dir: Path) -> Point:
    """The validation KL and score of a finished run (``metrics.json``)."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: no readable metrics of a finished run ({error}).") from None
    if VAL_KL not in metrics:
        raise UserError(
            f"{path} has no {VAL_KL}: the run evaluated no validation prompts "
            "(evaluation.validation.prompts_file)."
        )
    score = metrics.get(VAL_SCORE)
    return Point(knob, float(metrics[VAL_KL]), None if score is None else float(score), run_dir)


def launch(command: list[str]) -> int:
    """Run ``command`` (an ``fpo-train`` sweep) in the current folder; its exit status."""
    print("$", " ".join(command), flush=True)
    return subprocess.run(command).returncode


class Runner:
    """Measures a knob value's validation KL, running ``fpo-train`` only when no finished
    run of that value exists; keeps every point it read in ``points``."""

    def __init__(
        self,
        series_dir: Path,
        knob: str,
        overrides: list[str],
        launcher: Callable[[list[str]], int] = launch,
    ) -> None:
        self.series_dir = Path(series_dir)
        self.knob = knob
        self.overrides = list(overrides)
        self.launcher = launcher
        self.points: dict[float, Point] = {}
        self.launched: list[float] = []

    def value_dir(self, value: float) -> Path:
        return self.series_dir / f"{self.knob}={format_knob(value)}"

    def run_dir(self, value: float) -> Path:
        return self.value_dir(value) / RUN_SUBDIR

    def command(self, value: float) -> list[str]:
        """``fpo-train -m OVERRIDES KNOB=VALUE`` as one job in the value's folder."""
        folder = str(self.value_dir(value)).replace("\\", "\\\\").replace("'", "\\'")
        return [
            sys.executable, "-m", "fpo.commands.train", "-m", *self.overrides,
            f"{self.knob}={format_knob(value)}", f"++{VALIDATION_ONLY}=true",
            f"hydra.sweep.dir='{folder}'", f"hydra.sweep.subdir={RUN_SUBDIR}",
        ]  # fmt: skip

    def finished(self) -> dict[float, Point]:
        """Every finished run of this knob in the series folder (read, not run)."""
        pattern = f"{self.knob}=*/{RUN_SUBDIR}/{STATUS_FILE}"
        for status_file in sorted(self.series_dir.glob(pattern)):
            run_dir = status_file.parent
            text = run_dir.parent.name.split("=", 1)[1]
            try:
                value = float(text)
            except ValueError:
                continue  # not a folder this module named
            if (read_status(run_dir) or {}).get("status") == "finished":
                self.points[value] = read_point(value, run_dir)
        return dict(self.points)

    def measure(self, value: float) -> float:
        """The validation KL at ``value``: read when finished, else run (or resume) first."""
        if value in self.points:
            return self.points[value].val_kl
        run_dir = self.run_dir(value)
        if (read_status(run_dir) or {}).get("status") != "finished":
            self.launched.append(value)
            self.launcher(self.command(value))
            status = read_status(run_dir) or {}
            if status.get("status") != "finished":
                error = status.get("error") or "no job_status.json: the run did not start"
                raise UserError(
                    f"the calibration run {run_dir} did not finish ({error}). Fix the cause "
                    "or narrow the range (--low/--high), then run the same command again: "
                    "finished runs are reused."
                )
        self.points[value] = read_point(value, run_dir)
        return self.points[value].val_kl
