"""Interpolation along a frontier and the bootstrap's draws and summaries.

Shapes: ``B`` bootstrap replicates, ``P`` prompts, ``R`` runs on one seed's frontier,
``S`` seeds.
"""

from __future__ import annotations

import numpy as np

CONFIDENCE = 0.95


def interpolate(kl: np.ndarray, score: np.ndarray, target: float) -> np.ndarray:
    """The score at KL ``target`` on each row's frontier, by linear interpolation between
    the two points that bracket it; NaN where the row's points do not bracket the target
    (never extrapolated).

    Args:
        kl: ``(B, R)`` the KLs of a frontier's ``R`` points, in any order, per row.
        score: ``(B, R)`` their scores.

    Returns:
        ``(B,)``: ``s_lo + (target - k_lo) / (k_hi - k_lo) * (s_hi - s_lo)`` with
        ``k_lo <= target <= k_hi`` adjacent in KL order; a point exactly at the target gives
        its own score.
    """
    kl, score = np.atleast_2d(kl).astype(np.float64), np.atleast_2d(score).astype(np.float64)
    order = np.argsort(kl, axis=1, kind="stable")
    kl, score = np.take_along_axis(kl, order, 1), np.take_along_axis(score, order, 1)
    below = (kl <= target).sum(axis=1) - 1  # the last point at or below the target
    inside = (below >= 0) & (kl[:, -1] >= target)
    low = np.clip(below, 0, kl.shape[1] - 1)
    high = np.clip(below + 1, 0, kl.shape[1] - 1)
    rows = np.arange(kl.shape[0])
    k_lo, k_hi, s_lo, s_hi = kl[rows, low], kl[rows, high], score[rows, low], score[rows, high]
    at_point = (k_lo == target) | (low == high)
    span = np.where(at_point, 1.0, k_hi - k_lo)
    value = np.where(at_point, s_lo, s_lo + (target - k_lo) / span * (s_hi - s_lo))
    return np.where(inside, value, np.nan)


def prompt_weights(rng: np.random.Generator, prompts: int, replicates: int) -> np.ndarray:
    """``(B, P)``: how often each prompt is drawn in each replicate (``P`` draws with
    replacement), so a resampled mean of per-prompt values ``m`` is ``weights @ m / P``."""
    draws = rng.integers(0, prompts, size=(replicates, prompts))
    offsets = (np.arange(replicates) * prompts)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=replicates * prompts)
    return counts.reshape(replicates, prompts).astype(np.float64)


def seed_mean(values: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """The mean over seeds drawn with replacement, seeds without a value left out.

    Args:
        values: ``(B, S)`` one value per replicate and seed (NaN: the seed does not bracket
            the target in that replicate).
        uniform: ``(B, >= S)`` uniform [0, 1) numbers; ``floor(u * S)`` are the draws.

    Returns:
        ``(B,)``; NaN where no drawn seed has a value.
    """
    seeds = values.shape[1]
    draws = np.minimum((uniform[:, :seeds] * seeds).astype(np.int64), seeds - 1)
    drawn = np.take_along_axis(values, draws, 1)
    found = np.isfinite(drawn)
    total = np.where(found, drawn, 0.0).sum(axis=1)
    count = found.sum(axis=1)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def interval(replicates: np.ndarray) -> tuple[float, float] | None:
    """The 95% percentile interval of the finite replicates; ``None`` if there are none."""
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return None
    tail = (1 - CONFIDENCE) / 2 * 100
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


def p_value(differences: np.ndarray) -> tuple[float, bool] | None:
    """Two-sided bootstrap p-value of "no difference": ``2 * min(P(d <= 0), P(d >= 0))``
    over the finite replicates ``d``, at most 1 and at least ``1/B``; the flag is true when
    it sits at that floor (the bootstrap cannot resolve smaller: report ``< 1/B``)."""
    finite = differences[np.isfinite(differences)]
    if finite.size == 0:
        return None
    raw = 2 * min(float(np.mean(finite <= 0)), float(np.mean(finite >= 0)))
    floor = 1 / finite.size
    return min(1.0, max(raw, floor)), raw <= floor


def format_p(value: float, floored: bool) -> str:
    """``"0.032"``, or ``"< 0.0005"`` (``1/B``) when the p-value sits at the floor."""
    return f"< {value:.2g}" if floored else f"{value:.3g}"


def holm(p_values: list[float], family_size: int | None = None) -> list[float]:
    """Holm's step-down adjustment (family-wise error) of the given p-values, in input order:
    with ``p_(1) <= ... <= p_(k)`` sorted, ``q_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``.

    ``m`` is ``family_size`` (default ``k``): a family that names more hypotheses than have a
    p-value counts each missing one as p = 1, which sorts last and changes no other factor.
    """
    m = len(p_values) if family_size is None else family_size
    if m < len(p_values):
        raise ValueError(f"family_size {m} is smaller than the {len(p_values)} p-values given")
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted
