"""Chaos: a sweep and a cache build SIGKILLed at random (seeded) moments and restarted with
the same command end exactly where uninterrupted runs end (`fpo.testing.chaos`)."""

from __future__ import annotations

import random

import pytest

from fpo.testing.chaos import (
    SWEEP_PHASES,
    Kill,
    chaos_cache,
    chaos_sweep,
    differences,
    plan,
    stable,
)


def test_kill_plans_are_seeded_and_cover_every_phase():
    faults = {"checkpoint": "last.ckpt", "summary": "sweep_summary.json"}
    first = plan(random.Random(3), SWEEP_PHASES, 4, faults)
    assert [str(k) for k in first] == [
        str(k) for k in plan(random.Random(3), SWEEP_PHASES, 4, faults)
    ]
    assert sorted(k.phase for k in first) == sorted(SWEEP_PHASES)
    by_phase = {k.phase: k for k in first}
    assert by_phase["checkpoint"].fault.endswith(":last.ckpt")
    assert by_phase["summary"].fault.endswith(":sweep_summary.json")
    assert by_phase["training"].fault is None and by_phase["evaluation"].fault is None
    assert (
        str(Kill("training", delay=1.25, hit="job 1"))
        == "training (1.25s after the trigger): job 1"
    )


def test_comparison_ignores_wall_clock_and_restarts_but_not_numbers():
    ours = {"jobs": [{"value": 0.5, "seconds": 3.0, "attempts": 2, "metrics": {"a": 1.0}}]}
    theirs = {"jobs": [{"value": 0.5, "seconds": 9.0, "attempts": 1, "metrics": {"a": 1.0}}]}
    assert differences(stable(ours), stable(theirs), "s") == []
    theirs["jobs"][0]["metrics"]["a"] = 1.5
    assert differences(stable(ours), stable(theirs), "s") == [
        "s.jobs[0].metrics.a: 1.0 (uninterrupted) != 1.5"
    ]
    assert differences({"x": 1}, {}, "s") == ["s.x: missing"]


@pytest.mark.slow
def test_sweep_killed_in_every_phase_ends_as_the_uninterrupted_sweep(tmp_path):
    report = chaos_sweep(tmp_path, runs=4, seed=0)
    assert report.ok, str(report)
    assert all(k.hit and not k.hit.startswith("not killed") for k in report.kills), str(report)


@pytest.mark.slow
def test_cache_build_killed_repeatedly_is_byte_identical_to_an_uninterrupted_one(tmp_path):
    report = chaos_cache(tmp_path, runs=3, seed=0)
    assert report.ok, str(report)
    assert any(not k.hit.startswith("not killed") for k in report.kills), str(report)
