"""The calibration search on synthetic monotone KL curves (fpo.calibration.search): knobs that
raise and knobs that lower KL, unreachable targets, reuse of measured points, the run
budget and the seed bracket."""

from __future__ import annotations

import math

import pytest

from fpo.calibration import search
from fpo.calibration.search import (
    Status,
    Tolerance,
    bracket,
    calibrate,
    calibrate_target,
    propose,
    round_knob,
)


class Counted:
    """A KL curve that records every knob it was asked about (one "run" each)."""

    def __init__(self, curve):
        self.curve, self.calls = curve, []

    def __call__(self, knob: float) -> float:
        self.calls.append(knob)
        return self.curve(knob)


def lr_curve(lr: float) -> float:  # raises KL, like SimPO's learning rate (22 nats at 1e-5)
    return 22.0 * (lr / 1e-5) ** 1.3


def beta_curve(beta: float) -> float:  # lowers KL, like DPO's beta
    return 2.5 / beta**0.4


def alpha_curve(alpha: float) -> float:  # lowers KL, saturating at both ends like FPO's alpha
    return 0.5 + 35.0 / (1.0 + (alpha / 1e-5) ** 0.9)


CASES = [
    pytest.param(lr_curve, 1e-7, 1e-5, id="increasing"),
    pytest.param(beta_curve, 0.03, 10.0, id="decreasing"),
    pytest.param(alpha_curve, 1e-6, 1e-3, id="decreasing-saturating"),
]


def significant_digits(value: float) -> int:
    return len(f"{value:e}".split("e")[0].replace(".", "").rstrip("0"))


@pytest.mark.parametrize(("curve", "low", "high"), CASES)
@pytest.mark.parametrize("target", [3.0, 6.0])
def test_lands_within_the_tolerance_of_the_target(curve, low, high, target):
    measure = Counted(curve)
    result = calibrate(measure, target, low, high, max_runs=6)
    assert result.status is Status.converged
    assert abs(curve(result.chosen) - target) <= Tolerance().allowed(target)
    assert measure.calls == result.new_runs  # every run counted, none twice
    assert len(set(measure.calls)) == len(measure.calls) <= 6
    assert measure.calls[:2] == [low, high]  # the range's ends first
    assert all(significant_digits(k) <= 3 for k in measure.calls)


@pytest.mark.parametrize(("curve", "low", "high"), CASES)
@pytest.mark.parametrize("target", [3.0, 6.0])
def test_seed_bracket_lies_a_tolerance_or_more_on_each_side(curve, low, high, target):
    result = calibrate_target(Counted(curve), target, low, high, max_runs=10)
    allowed = Tolerance().allowed(target)
    below, above = result.seed_knobs
    assert target - 3 * allowed <= curve(below) <= target - allowed
    assert target + allowed <= curve(above) <= target + 3 * allowed
    # a knob that lowers KL brackets the target with the larger value below it
    assert (below < above) == (curve(high) > curve(low))
    assert result.lower.status is result.upper.status is Status.converged


def test_a_side_that_cannot_be_searched_falls_back_to_the_closest_run():
    # beta_curve tops out at 6.28 nats in [0.1, 10]: no run lands in [6.6, 7.8]
    result = calibrate_target(beta_curve, 6.0, 0.1, 10.0, max_runs=10)
    assert result.on_target.status is Status.converged
    assert result.upper.status is Status.unreachable
    assert result.above == 0.1  # the closest run over the target: the range's end
    # a target too small for a lower band (target - 2 tolerances <= 0) keeps the closest
    small = calibrate_target(lr_curve, 0.5, 1e-8, 1e-5, max_runs=10)
    assert small.lower is None and small.below is not None
    assert lr_curve(small.below) < 0.5


def test_an_unreachable_target_is_a_finding_with_the_measured_range():
    measure = Counted(beta_curve)
    result = calibrate_target(measure, 30.0, 0.1, 10.0)
    assert result.on_target.status is Status.unreachable
    assert result.on_target.finding == (
        "unreachable within [0.1, 10]: KL range measured [0.995, 6.28]"
    )
    assert measure.calls == [0.1, 10.0]  # the two ends, nothing more
    assert result.lower is result.upper is None and result.seed_knobs is None


def test_points_already_measured_are_reused_not_measured_again():
    first = Counted(alpha_curve)
    done = calibrate_target(first, 3.0, 1e-6, 1e-3, max_runs=10)
    again = Counted(alpha_curve)
    redone = calibrate_target(again, 3.0, 1e-6, 1e-3, known=done.points, max_runs=10)
    assert again.calls == []
    assert redone.on_target.chosen == done.on_target.chosen
    assert redone.seed_knobs == done.seed_knobs
    # points of another target narrow the bracket: the second target needs fewer new runs
    cold = Counted(alpha_curve)
    calibrate(cold, 6.0, 1e-6, 1e-3)
    warm = Counted(alpha_curve)
    calibrate(warm, 6.0, 1e-6, 1e-3, known=done.points)
    assert len(warm.calls) < len(cold.calls)
    # a known point outside the range is not used
    outside = calibrate(Counted(beta_curve), 3.0, 0.1, 10.0, known={20.0: 0.4})
    assert 20.0 not in outside.points


def test_the_run_budget_stops_the_search():
    measure = Counted(alpha_curve)
    result = calibrate(measure, 3.0, 1e-6, 1e-3, max_runs=3)
    assert result.status is Status.max_runs and len(measure.calls) == 3
    assert result.chosen is None and result.closest is not None
    assert "run budget spent" in result.finding
    nothing = calibrate(Counted(alpha_curve), 3.0, 1e-6, 1e-3, max_runs=0)
    assert nothing.status is Status.max_runs and nothing.points == {}
    # calibrate_target shares one budget among its three searches
    shared = Counted(alpha_curve)
    calibrate_target(shared, 3.0, 1e-6, 1e-3, max_runs=4)
    assert len(shared.calls) == 4


def kinked(knob: float) -> float:
    """Gentle under 3.3e-5, then steep (a run that starts to run away): KL 3 at the kink,
    3.6e6 nats at 1e-3. Plain false position keeps replacing the low end by a sliver
    (19 runs to reach 3 nats)."""
    ratio = knob / 3.3e-5
    return 3.0 * ratio ** (0.5 if ratio < 1 else 4.0)


@pytest.mark.parametrize("keep_from_the_ends", [True, False])
def test_a_kinked_curve_still_converges_in_few_runs(keep_from_the_ends, monkeypatch):
    """Each safeguard alone (the middle 80% of the bracket; bisection after two new
    points on one side of the target) reaches the target in at most 9 runs."""
    if not keep_from_the_ends:
        monkeypatch.setattr(search, "EDGE", 0.0)
    for curve in (kinked, lambda beta: kinked(1.1e-9 / beta)):  # raising and lowering KL
        low, high = (1e-6, 1e-3) if curve is kinked else (1.1e-6, 1.1e-3)
        measure = Counted(curve)
        result = calibrate(measure, 3.0, low, high, max_runs=12)
        assert result.status is Status.converged and len(measure.calls) <= 9


def test_a_proposal_stays_inside_the_middle_of_the_bracket():
    points = {1e-6: 2.0, 1e-3: 1e6}  # the line in log-log meets 3 nats at 3% of the way
    share = math.log(propose((1e-6, 1e-3), points, 3.0, bisect=False) / 1e-6) / math.log(1e3)
    assert share == pytest.approx(search.EDGE, abs=0.01)
    assert propose((1e-6, 1e-3), points, 3.0, bisect=True) == pytest.approx(3.16e-5)


def test_rounding_stops_a_bracket_narrower_than_the_knob_resolution():
    def step(beta: float) -> float:  # jumps across the target between 1.0 and 1.01
        return 8.0 if beta <= 1.0 else 1.0

    result = calibrate(step, 3.0, 1.0, 1.01, digits=3)
    assert result.status is Status.resolution
    assert result.below == 1.01 and result.above == 1.0


def test_bracket_under_noise_takes_the_pair_closest_to_the_target():
    points = {0.1: 8.0, 0.3: 2.0, 0.5: 3.5, 1.0: 2.9, 3.0: 1.0}  # 0.5 is a noisy bump
    assert bracket(points, 3.0) == (0.5, 1.0)
    assert bracket({0.1: 8.0, 1.0: 5.0}, 3.0) is None


def test_tolerance_and_input_checks():
    assert Tolerance().allowed(3.0) == pytest.approx(0.3)
    assert Tolerance().allowed(6.0) == pytest.approx(0.6)
    assert round_knob(1.23456e-5) == 1.23e-5
    with pytest.raises(ValueError, match="0 < low < high"):
        calibrate(beta_curve, 3.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        calibrate(beta_curve, 0.0, 0.1, 1.0)
