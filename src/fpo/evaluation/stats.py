"""Means, standard errors and win rates over samples grouped by prompt.

Samples of the same prompt are correlated (they share the prompt), so the prompt is the
independent unit: a statistic is first averaged within each prompt, then over prompts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def grouped_mean_stderr(
    values: Sequence[float], groups: Sequence[int]
) -> tuple[float, float | None]:
    """Mean of the per-group means and its standard error.

    With ``G`` groups and group means ``m_g``: ``mean = (1/G) sum_g m_g`` and
    ``stderr = std(m, ddof=1) / sqrt(G)``; ``stderr`` is ``None`` when ``G < 2`` (undefined).
    With equal group sizes (``num_samples`` per prompt) the mean is the plain sample mean.
    """
    if len(values) != len(groups):
        raise ValueError(f"grouped_mean_stderr: {len(values)} values but {len(groups)} groups")
    if not values:
        raise ValueError("grouped_mean_stderr: no values")
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    for value, group in zip(values, groups, strict=True):
        sums[group] = sums.get(group, 0.0) + float(value)
        counts[group] = counts.get(group, 0) + 1
    means = [sums[g] / counts[g] for g in sums]
    mean = sum(means) / len(means)
    if len(means) < 2:
        return mean, None
    variance = sum((m - mean) ** 2 for m in means) / (len(means) - 1)
    return mean, math.sqrt(variance / len(means))


def pairwise_wins(policy_scores: Sequence[float], reference_scores: Sequence[float]) -> list[float]:
    """Per pair: 1.0 if the policy's score is higher, 0.5 on a tie, 0.0 if lower.

    The win rate is the mean of these values (ties count half).
    """
    if len(policy_scores) != len(reference_scores):
        raise ValueError(
            f"pairwise_wins: {len(policy_scores)} policy scores but "
            f"{len(reference_scores)} reference scores"
        )
    return [
        1.0 if p > r else 0.5 if p == r else 0.0
        for p, r in zip(policy_scores, reference_scores, strict=True)
    ]
