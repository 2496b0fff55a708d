"""The training cost of a run, summed over every attempt that built it.

A run interrupted and resumed from its ``last.ckpt`` trains in several processes; timing
only the last one would report a fraction of its cost. :class:`FitClock` (a callback on
every trainer ``fpo.builder`` builds) keeps the time already spent in the checkpoint and
adds the current attempt's:

- ``run/fit_seconds``: wall time of ``trainer.fit``, every attempt;
- ``run/fit_cpu_seconds``: CPU time of the process (all its threads), every attempt;
- ``run/fit_attempts``: how many processes trained the run (1 when never resumed);
- ``run/fit_load_average``: the machine's 1-minute load average (``os.getloadavg``) read at
  the end of every training batch, averaged with the wall time since the previous reading as
  weight (a batch slowed by other jobs counts for as long as it took), and
  ``run/cpu_count``: its CPUs. A load well above the CPU count means other jobs shared the
  machine, so the times above measure the sharing as much as the run
  (`fpo.machine_load.ran_alone`).

Work done after the last checkpoint of a killed attempt is lost with it and not counted.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from fpo.machine_load import load_average


class FitClock(Callback):
    """Wall and CPU time of ``fit`` and the machine's load during it, kept across resumes."""

    def __init__(self) -> None:
        self.earlier = {"seconds": 0.0, "cpu_seconds": 0.0, "attempts": 0}
        self.load_sum, self.load_seconds = 0.0, 0.0  # sum of load x seconds, and the seconds
        self.started: tuple[float, float] | None = None
        self.last_reading: float | None = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit":
            self.started = (time.perf_counter(), time.process_time())
            self.last_reading = self.started[0]

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        seconds, self.last_reading = now - (self.last_reading or now), now
        if (load := load_average()) is not None:
            self.load_sum += load * seconds
            self.load_seconds += seconds

    def totals(self) -> dict[str, float]:
        """The run's ``run/*`` cost metrics so far (this attempt up to now included)."""
        wall, cpu = self.started or (time.perf_counter(), time.process_time())
        totals = {
            "run/fit_seconds": self.earlier["seconds"] + time.perf_counter() - wall,
            "run/fit_cpu_seconds": self.earlier["cpu_seconds"] + time.process_time() - cpu,
            "run/fit_attempts": float(self.earlier["attempts"] + 1),
            "run/cpu_count": float(os.cpu_count() or 1),
        }
        if self.load_seconds > 0:
            totals["run/fit_load_average"] = self.load_sum / self.load_seconds
        return totals

    def state_dict(self) -> dict[str, float]:
        totals = self.totals()
        return {
            "seconds": totals["run/fit_seconds"],
            "cpu_seconds": totals["run/fit_cpu_seconds"],
            "attempts": int(totals["run/fit_attempts"]),
            "load_sum": self.load_sum,
            "load_seconds": self.load_seconds,
        }

    def load_state_dict(self, state_dict: Mapping[str, float]) -> None:
        self.earlier = {
            "seconds": float(state_dict["seconds"]),
            "cpu_seconds": float(state_dict["cpu_seconds"]),
            "attempts": int(state_dict["attempts"]),
        }
        self.load_sum = float(state_dict.get("load_sum", 0.0))
        self.load_seconds = float(state_dict.get("load_seconds", 0.0))
