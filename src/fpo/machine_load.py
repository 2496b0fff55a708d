"""Whether a run's timing measured the run or the machine: other jobs on the same CPUs
slow it down and, with spinning threads, inflate its CPU time too.

`fpo.fit_clock.FitClock` records the machine's mean 1-minute load average while a run
trains (``run/fit_load_average``) and its CPU count (``run/cpu_count``); :func:`ran_alone`
reads them back.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

#: A fit whose mean load average exceeds this many times the CPU count shared the machine.
#: A run alone on 2 CPUs reads 1.8-1.95; one single-threaded job beside it adds about 1.
SHARED_LOAD_FACTOR = 1.1


def load_average() -> float | None:
    """The machine's 1-minute load average (``None`` where the platform has none)."""
    with contextlib.suppress(OSError, AttributeError):
        return os.getloadavg()[0]
    return None


def ran_alone(metrics: Mapping[str, Any]) -> bool | None:
    """Whether a run's fit had the machine to itself: its mean load average at most
    :data:`SHARED_LOAD_FACTOR` x its CPU count (``None``: not recorded, an older run)."""
    load, cpus = metrics.get("run/fit_load_average"), metrics.get("run/cpu_count")
    if load is None or not cpus:
        return None
    return float(load) <= SHARED_LOAD_FACTOR * float(cpus)
