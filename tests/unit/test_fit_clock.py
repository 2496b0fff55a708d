"""A run's training cost over every attempt (`fpo.fit_clock.FitClock`) and whether its machine
was shared meanwhile (`fpo.machine_load.ran_alone`)."""

from __future__ import annotations

import time

import pytest

from fpo import fit_clock
from fpo.fit_clock import FitClock
from fpo.machine_load import ran_alone


def spend_cpu(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


class FakeWallClock:
    """``time`` for `fpo.fit_clock`: wall time set by the test, the real process time."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    process_time = staticmethod(time.process_time)


def test_a_resumed_clock_adds_the_attempts_its_checkpoint_recorded(monkeypatch):
    wall = FakeWallClock()
    monkeypatch.setattr(fit_clock, "time", wall)
    loads = iter([4.0, 2.0, 2.0])
    monkeypatch.setattr(fit_clock, "load_average", lambda: next(loads))
    first = FitClock()
    first.setup(None, None, "fit")
    wall.now += 30.0  # a batch slowed by another job: 30 s at load 4
    first.on_train_batch_end()
    wall.now += 10.0  # then a quiet one: 10 s at load 2
    first.on_train_batch_end()
    spend_cpu(0.05)
    saved = first.state_dict()  # what last.ckpt keeps
    assert saved["attempts"] == 1 and saved["seconds"] == pytest.approx(40.0)
    assert saved["cpu_seconds"] >= 0.05

    second = FitClock()
    second.load_state_dict(saved)
    second.setup(None, None, "fit")
    wall.now += 20.0  # quiet: 20 s at load 2
    second.on_train_batch_end()
    spend_cpu(0.02)
    totals = second.totals()
    assert totals["run/fit_attempts"] == 2
    assert totals["run/fit_seconds"] == pytest.approx(60.0)
    assert totals["run/fit_cpu_seconds"] >= saved["cpu_seconds"] + 0.02
    # weighted by time, not by batch: (30 x 4 + 10 x 2 + 20 x 2) / 60 = 3, not 8 / 3
    assert totals["run/fit_load_average"] == pytest.approx(3.0)


def test_a_clock_that_never_saw_a_batch_records_no_load(monkeypatch):
    monkeypatch.setattr(fit_clock, "load_average", lambda: None)  # a platform without one
    clock = FitClock()
    clock.setup(None, None, "fit")
    clock.on_train_batch_end()
    totals = clock.totals()
    assert "run/fit_load_average" not in totals and totals["run/fit_attempts"] == 1


@pytest.mark.parametrize(
    ("metrics", "alone"),
    [
        ({"run/fit_load_average": 1.9, "run/cpu_count": 2.0}, True),
        ({"run/fit_load_average": 2.2, "run/cpu_count": 2.0}, True),
        ({"run/fit_load_average": 2.3, "run/cpu_count": 2.0}, False),
        ({"run/fit_load_average": 9.0, "run/cpu_count": 16.0}, True),
        ({"run/fit_cpu_seconds": 400.0}, None),  # an older run: not recorded
    ],
)
def test_a_run_had_the_machine_to_itself_up_to_a_load_of_1_1_per_cpu(metrics, alone):
    assert ran_alone(metrics) is alone
