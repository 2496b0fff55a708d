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


def test_a_resumed_clock_adds_the_attempts_its_checkpoint_recorded(monkeypatch):
    loads = iter([1.0, 3.0, 2.0])
    monkeypatch.setattr(fit_clock, "load_average", lambda: next(loads))
    first = FitClock()
    first.setup(None, None, "fit")
    first.on_train_batch_end()
    first.on_train_batch_end()
    spend_cpu(0.05)
    saved = first.state_dict()  # what last.ckpt keeps
    assert saved["attempts"] == 1 and saved["cpu_seconds"] >= 0.05
    assert saved["seconds"] >= saved["cpu_seconds"] * 0.5

    second = FitClock()
    second.load_state_dict(saved)
    second.setup(None, None, "fit")
    second.on_train_batch_end()
    spend_cpu(0.02)
    totals = second.totals()
    assert totals["run/fit_attempts"] == 2
    assert totals["run/fit_cpu_seconds"] >= saved["cpu_seconds"] + 0.02
    assert totals["run/fit_seconds"] >= saved["seconds"]
    assert totals["run/fit_load_average"] == pytest.approx(2.0)  # (1 + 3 + 2) / 3 batches


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
        ({"run/fit_load_average": 2.4, "run/cpu_count": 2.0}, True),
        ({"run/fit_load_average": 2.6, "run/cpu_count": 2.0}, False),
        ({"run/fit_load_average": 9.0, "run/cpu_count": 16.0}, True),
        ({"run/fit_cpu_seconds": 400.0}, None),  # an older run: not recorded
    ],
)
def test_a_run_had_the_machine_to_itself_up_to_a_load_of_1_25_per_cpu(metrics, alone):
    assert ran_alone(metrics) is alone
