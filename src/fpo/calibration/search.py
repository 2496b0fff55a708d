"""The search alone: which knob value puts a measured KL at a target (no runs, no files).

:func:`calibrate` brackets the target between two measured knob values and narrows the
bracket by false position (regula falsi): the next knob is where the straight line through
the bracket's two ``(log knob, log KL)`` points crosses the target (KL roughly follows a
power of a learning rate, a beta or an alpha, a straight line in log-log). Two safeguards
keep it from crawling when the curve bends (plain false position can move one end by a
hair per step): the proposal stays inside the middle 80% of the bracket (in log knob), and
after two new measurements on the same side of the target the next one bisects (the idea
of the Illinois variant, without its weights).

It works for knobs that raise KL (a learning rate) and knobs that lower it (beta, a
constraint's alpha) alike: only the sign of ``KL - target`` at the bracket's ends matters.
Every point the caller already measured (``known``) is used before anything is measured
anew, so a second call with the first call's points repeats no measurement.

:func:`calibrate_target` adds the seed runs' bracket: two knob values whose KLs lie a
tolerance or more below and above the target (see :class:`TargetCalibration`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

#: Knob values are rounded to this many significant digits: readable folder names, and a
#: proposal that rounds onto an earlier point reuses it.
DIGITS = 3
#: KLs under this many nats count as this much when interpolating on log(KL).
KL_FLOOR = 0.01
#: The proposal stays this share of the bracket's log-width away from either end.
EDGE = 0.1


@dataclass(frozen=True)
class Tolerance:
    """A KL within ``max(absolute, relative * target)`` nats of the target counts as on it."""

    relative: float = 0.1
    absolute: float = 0.3

    def allowed(self, target: float) -> float:
        return max(self.absolute, self.relative * target)


class Status(StrEnum):
    """How a search ended."""

    converged = "converged"  # a measured KL is within the tolerance of the target
    unreachable = "unreachable"  # every measured KL in [low, high] is on one side
    max_runs = "max_runs"  # the run budget ended first
    resolution = "resolution"  # the bracket is narrower than the knob's rounding


@dataclass
class Calibration:
    """The outcome of :func:`calibrate` for one target.

    ``points`` maps every knob value in ``[low, high]`` that was measured (before or during
    this call) to its KL; ``new_runs`` lists those this call measured, in order.
    """

    target: float
    low: float
    high: float
    allowed: float
    status: Status
    points: dict[float, float] = field(default_factory=dict)
    new_runs: list[float] = field(default_factory=list)

    @property
    def closest(self) -> float | None:
        """The knob whose KL is nearest the target (ties: the smaller knob)."""
        if not self.points:
            return None
        return min(sorted(self.points), key=lambda k: abs(self.points[k] - self.target))

    @property
    def chosen(self) -> float | None:
        """The calibrated knob value: ``closest`` when it is within the tolerance."""
        return self.closest if self.status is Status.converged else None

    @property
    def below(self) -> float | None:
        """The knob of the highest KL under the target (the bracket's lower-KL side)."""
        under = [k for k, kl in self.points.items() if kl < self.target]
        return max(sorted(under), key=lambda k: self.points[k]) if under else None

    @property
    def above(self) -> float | None:
        """The knob of the lowest KL at or over the target (the bracket's higher-KL side)."""
        over = [k for k, kl in self.points.items() if kl >= self.target]
        return min(sorted(over), key=lambda k: self.points[k]) if over else None

    @property
    def kl_range(self) -> tuple[float, float] | None:
        values = list(self.points.values())
        return (min(values), max(values)) if values else None

    @property
    def finding(self) -> str:
        """One sentence on the outcome, for the report."""
        if self.status is Status.converged:
            kl = self.points[self.chosen]
            return f"KL {kl:.3g} at {self.chosen:g} (within {self.allowed:.3g} of {self.target:g})"
        span = self.kl_range
        measured = f"KL range measured [{span[0]:.3g}, {span[1]:.3g}]" if span else "no KL"
        if self.status is Status.unreachable:
            return f"unreachable within [{self.low:g}, {self.high:g}]: {measured}"
        if self.status is Status.max_runs:
            return f"run budget spent before reaching the tolerance: {measured}"
        return f"bracket narrower than {DIGITS} significant digits of the knob: {measured}"


class _BudgetSpent(Exception):
    pass


def round_knob(value: float, digits: int = DIGITS) -> float:
    """``value`` to ``digits`` significant digits."""
    return float(f"{value:.{digits}g}")


def calibrate(
    measure: Callable[[float], float],
    target: float,
    low: float,
    high: float,
    *,
    known: Mapping[float, float] | None = None,
    tolerance: Tolerance = Tolerance(),
    max_runs: int = 6,
    digits: int = DIGITS,
) -> Calibration:
    """Find the knob value in ``[low, high]`` whose ``measure`` lands within the tolerance
    of ``target``.

    Args:
        measure: knob value -> KL (one training run per call; assumed monotone in the knob,
            up to noise).
        target: the KL to reach (nats).
        low, high: the search range, ``0 < low < high`` (rounded to ``digits``).
        known: knob -> KL already measured (earlier runs); those in range are used first.
        tolerance: when a KL counts as on the target.
        max_runs: at most this many new measurements (calls of ``measure``).
        digits: significant digits of every knob value measured.

    Both ends of the range are measured first (unless known); the target is unreachable when
    every KL in range lies on one side of it. Otherwise the bracket (the two neighbouring
    knob values whose KLs straddle the target, the one with the smallest KL gap to the
    target where noise makes several) narrows by safeguarded false position on log(knob)
    until a KL is within the tolerance, the budget is spent or the rounding stops it.
    """
    if not 0 < low < high:
        raise ValueError(f"the search range needs 0 < low < high, got [{low}, {high}]")
    if target <= 0:
        raise ValueError(f"the target KL must be positive, got {target}")
    low, high = round_knob(low, digits), round_knob(high, digits)
    points = {float(k): float(v) for k, v in (known or {}).items() if low <= k <= high}
    result = Calibration(target, low, high, tolerance.allowed(target), Status.max_runs, points)

    def measured(knob: float) -> float:
        if knob not in points:
            if len(result.new_runs) >= max_runs:
                raise _BudgetSpent
            points[knob] = float(measure(knob))
            result.new_runs.append(knob)
        return points[knob]

    sides: list[bool] = []  # for each measurement of the loop: was its KL over the target?
    try:
        measured(low)
        measured(high)
        while True:
            if abs(points[result.closest] - target) <= result.allowed:
                result.status = Status.converged
                break
            pair = bracket(points, target)
            if pair is None:
                result.status = Status.unreachable
                break
            bisect = len(sides) >= 2 and sides[-1] == sides[-2]
            knob = propose(pair, points, target, bisect=bisect, digits=digits)
            if not pair[0] < knob < pair[1]:
                result.status = Status.resolution
                break
            sides.append(measured(knob) >= target)
    except _BudgetSpent:
        result.status = Status.max_runs
    return result


def bracket(points: Mapping[float, float], target: float) -> tuple[float, float] | None:
    """Neighbouring knob values (in knob order) whose KLs lie on both sides of the target;
    of several such pairs (noise), the one closest to the target in KL. ``None``: no pair."""
    knobs = sorted(points)
    pairs = [
        (a, b) for a, b in itertools.pairwise(knobs) if (points[a] < target) != (points[b] < target)
    ]
    if not pairs:
        return None
    return min(pairs, key=lambda p: abs(points[p[0]] - target) + abs(points[p[1]] - target))


def propose(
    pair: tuple[float, float],
    points: Mapping[float, float],
    target: float,
    *,
    bisect: bool,
    digits: int = DIGITS,
) -> float:
    """The next knob inside ``pair``: false position on log(knob) (or the log-midpoint with
    ``bisect``), kept ``EDGE`` of the bracket's log-width from either end, rounded."""
    a, b = pair
    la, lb = math.log(a), math.log(b)
    if bisect:
        share = 0.5
    else:  # on log(KL): KL roughly follows a power of the knob, a line in log-log
        floor = min(KL_FLOOR, target / 10)  # a sampled KL near 0 can come out <= 0
        ga, gb = (math.log(max(points[k], floor) / target) for k in (a, b))
        share = ga / (ga - gb)  # where the line through both points meets the target
    share = min(max(share, EDGE), 1 - EDGE)
    return round_knob(math.exp(la + share * (lb - la)), digits)


@dataclass
class TargetCalibration:
    """One target's calibration: the search on the target and the seed runs' bracket.

    The study runs every seed at two knob values and interpolates each seed's score at the
    target between them, so both values must stay on their side of the target for every
    seed: the closest runs below and above the target may sit within seed noise of it (the
    converged point is, by construction). ``lower``/``upper`` are searches for a KL in
    ``[target - 3t, target - t]`` and ``[target + t, target + 3t]`` (``t`` the tolerance);
    ``None`` when not run (the target is unreachable, or ``target - 2t <= 0``). A side whose
    search did not converge falls back to the closest run on that side of the target.
    """

    on_target: Calibration
    lower: Calibration | None = None
    upper: Calibration | None = None

    @property
    def points(self) -> dict[float, float]:
        merged = dict(self.on_target.points)
        for side in (self.lower, self.upper):
            merged.update(side.points if side else {})
        return merged

    @property
    def new_runs(self) -> list[float]:
        sides = [s for s in (self.on_target, self.lower, self.upper) if s is not None]
        return [knob for search in sides for knob in search.new_runs]

    def _side(self, search: Calibration | None, under: bool) -> float | None:
        if search is not None and search.chosen is not None:
            return search.chosen
        target, points = self.on_target.target, self.points
        side = [k for k, kl in points.items() if (kl < target) == under]
        if not side:
            return None
        nearest = max if under else min
        return nearest(sorted(side), key=lambda k: points[k])

    @property
    def below(self) -> float | None:
        """The seed runs' knob value under the target (in the band, else the closest)."""
        return self._side(self.lower, under=True)

    @property
    def above(self) -> float | None:
        """The seed runs' knob value over the target (in the band, else the closest)."""
        return self._side(self.upper, under=False)

    @property
    def seed_knobs(self) -> tuple[float, float] | None:
        pair = (self.below, self.above)
        return None if None in pair else pair


def calibrate_target(
    measure: Callable[[float], float],
    target: float,
    low: float,
    high: float,
    *,
    known: Mapping[float, float] | None = None,
    tolerance: Tolerance = Tolerance(),
    max_runs: int = 6,
    digits: int = DIGITS,
) -> TargetCalibration:
    """:func:`calibrate` on ``target``, then the two side searches of
    :class:`TargetCalibration`, all three within ``max_runs`` new measurements."""
    on_target = calibrate(
        measure, target, low, high,
        known=known, tolerance=tolerance, max_runs=max_runs, digits=digits,
    )  # fmt: skip
    result = TargetCalibration(on_target)
    if on_target.status is Status.unreachable:
        return result
    band = Tolerance(relative=0.0, absolute=on_target.allowed)
    for name, side_target in (
        ("lower", target - 2 * on_target.allowed),
        ("upper", target + 2 * on_target.allowed),
    ):
        if side_target <= 0:
            continue
        search = calibrate(
            measure, side_target, low, high,
            known={**(known or {}), **result.points}, tolerance=band,
            max_runs=max_runs - len(result.new_runs), digits=digits,
        )  # fmt: skip
        setattr(result, name, search)
    return result
