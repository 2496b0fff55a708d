"""Judge scores at matched KL: each objective's score at the same KL(policy || reference).

An objective's runs differ in a strength knob (beta, the feature term's alpha, the learning
rate...) and in their seed. One seed's runs of one objective form that seed's *frontier*:
its points (KL, score) sorted by KL. At a target KL the seed's score is the linear
interpolation between the two points that bracket the target; a seed whose points do not
bracket it is left out (counted in ``n_seeds_excluded``), never extrapolated. The cell's
score is the mean over the seeds that bracket it; when none does, the cell says
``outside measured KL range [lo, hi]`` (the objective's lowest and highest run KL).

The interval is a two-level bootstrap, one replicate at a time: draw the objective's seeds
with replacement (independently per objective: their runs are separate trainings), draw the
test prompts with replacement (one draw shared by every run that evaluated the same
prompts), recompute each run's mean KL and mean score from its per-prompt means, and
re-interpolate. ``score_low``/``score_high`` are the 2.5th and 97.5th percentiles of the
replicates. The difference from the baseline objective is taken replicate by replicate
(the same prompt draw on both sides); its p-value is two-sided,
``2 * min(P(d <= 0), P(d >= 0))``, floored at ``1/B``. ``p_holm`` is that p-value
Holm-adjusted over its family: every difference of the same judge in the table (each
objective against the baseline at each target, on the one test set read), or, given
``holm_family``, that many differences per judge, those without a value (an objective
outside its KL range, or with no runs at all) counted as p = 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fpo.compare.bootstrap import (
    format_p,
    holm,
    interpolate,
    interval,
    p_value,
    prompt_weights,
    seed_mean,
)
from fpo.compare.runs import Run
from fpo.compare.sample_scores import RunScores, read_run_scores
from fpo.errors import UserError

COLUMNS = [
    "objective", "judge", "target_kl", "score", "score_low", "score_high", "n_seeds",
    "n_seeds_excluded", "kl_low", "kl_high", "baseline", "diff", "diff_low", "diff_high",
    "p_value", "p_value_text", "p_holm", "note",
]  # fmt: skip


@dataclass
class MatchedKL:
    """`matched_kl_table`'s answer: ``rows`` (one per objective x judge x target, keys
    `COLUMNS`), the run scores it used and ``notes`` for the user."""

    rows: list[dict[str, Any]]
    scores: list[RunScores]
    judges: list[str]
    targets: list[float]
    baseline: str
    replicates: int
    notes: list[str] = field(default_factory=list)
    split: str | None = None  # the test set read: None = evaluation/, else evaluation/<split>
    holm_family: int | None = None  # Holm's m per judge; None: the differences in the table


@dataclass
class _Cell:
    score: float | None
    replicates: np.ndarray | None  # (B,), NaN where no drawn seed brackets the target
    n_seeds: int
    n_excluded: int
    kl_range: tuple[float, float]


def outside_text(kl_range: tuple[float, float]) -> str:
    return f"outside measured KL range [{kl_range[0]:.3g}, {kl_range[1]:.3g}]"


def _frontiers(scores: Sequence[RunScores]) -> dict[str, dict[str, list[RunScores]]]:
    """``{objective: {seed: [runs]}}`` in first-seen order."""
    grouped: dict[str, dict[str, list[RunScores]]] = {}
    for each in scores:
        seeds = grouped.setdefault(str(each.run.objective), {})
        seeds.setdefault(str(each.run.seed), []).append(each)
    return grouped


def _replicate_runs(
    scores: Sequence[RunScores], rng: np.random.Generator, replicates: int
) -> tuple[dict[int, tuple[np.ndarray, dict[str, np.ndarray]]], int]:
    """Per per-sample run (by ``id``): its ``(B,)`` resampled KL and ``{judge: (B,)}``
    scores, the prompts drawn once per prompt set. Returns them and the number of sets."""
    weights: dict[Any, np.ndarray] = {}
    resampled: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]] = {}
    for each in scores if replicates else ():
        if not each.per_sample:
            continue
        if each.prompts not in weights:
            weights[each.prompts] = prompt_weights(rng, len(each.prompts), replicates)
        draw = weights[each.prompts] / len(each.prompts)  # (B, P)
        means = {judge: draw @ values for judge, values in each.prompt_means.items()}
        resampled[id(each)] = (draw @ each.prompt_means_kl, means)
    return resampled, len(weights)


def _cell(
    seeds: dict[str, list[RunScores]],
    judge: str,
    target: float,
    resampled: dict[int, tuple[np.ndarray, dict[str, np.ndarray]]],
    uniform: np.ndarray,
) -> _Cell | None:
    """One objective x judge x target; ``None`` when no run of the objective has the judge."""
    frontiers = {seed: [r for r in runs if judge in r.scores] for seed, runs in seeds.items()}
    frontiers = {seed: runs for seed, runs in frontiers.items() if runs}
    if not frontiers:
        return None
    values = {
        seed: interpolate([[r.kl for r in runs]], [[r.scores[judge] for r in runs]], target)[0]
        for seed, runs in frontiers.items()
    }
    used = [seed for seed, value in values.items() if np.isfinite(value)]
    every_kl = [r.kl for runs in frontiers.values() for r in runs]
    cell = _Cell(
        score=float(np.mean([values[seed] for seed in used])) if used else None,
        replicates=None,
        n_seeds=len(used),
        n_excluded=len(frontiers) - len(used),
        kl_range=(min(every_kl), max(every_kl)),
    )
    if used and all(id(r) in resampled for seed in used for r in frontiers[seed]):
        per_seed = [
            interpolate(
                np.stack([resampled[id(r)][0] for r in frontiers[seed]], axis=1),
                np.stack([resampled[id(r)][1][judge] for r in frontiers[seed]], axis=1),
                target,
            )
            for seed in used
        ]  # each (B,)
        cell.replicates = seed_mean(np.stack(per_seed, axis=1), uniform)
    return cell


def _score_columns(cell: _Cell, row: dict[str, Any], replicates: int) -> None:
    row.update(n_seeds=cell.n_seeds, n_seeds_excluded=cell.n_excluded)
    row.update(kl_low=cell.kl_range[0], kl_high=cell.kl_range[1])
    if cell.score is None:
        row["note"] = outside_text(cell.kl_range)
        return
    row["score"] = cell.score
    notes = []
    if cell.replicates is None:
        notes.append("no interval: summary means only" if replicates else "no bootstrap")
    else:
        bounds = interval(cell.replicates)
        row["score_low"], row["score_high"] = bounds if bounds else (None, None)
        missing = int(np.sum(~np.isfinite(cell.replicates)))
        if missing:
            notes.append(f"{missing} of {replicates} replicates bracket nothing; left out")
    row["note"] = "; ".join(notes)


def _difference_columns(cell: _Cell, base: _Cell, row: dict[str, Any]) -> None:
    if cell.score is None or base.score is None:
        return
    row["diff"] = cell.score - base.score
    if cell.replicates is None or base.replicates is None:
        return
    differences = cell.replicates - base.replicates
    bounds = interval(differences)
    row["diff_low"], row["diff_high"] = bounds if bounds else (None, None)
    found = p_value(differences)
    if found is not None:
        row["p_value"], row["p_value_text"] = found[0], format_p(*found)


def _judges(scores: Sequence[RunScores], wanted: Sequence[str] | None) -> list[str]:
    found = list(dict.fromkeys(judge for each in scores for judge in each.scores))
    if not wanted:
        return found
    unknown = [judge for judge in wanted if judge not in found]
    if unknown:
        raise UserError(
            f"--judges: {', '.join(unknown)} scored no run; the runs have: {', '.join(found)}."
        )
    return list(wanted)


def _read(runs: Sequence[Run], split: str | None, notes: list[str]) -> list[RunScores]:
    scores, missing = [], []
    for run in runs:
        found = read_run_scores(run, split) if run.objective is not None else None
        (scores if found is not None else missing).append(found or run.name)
    where = f"evaluation/{split}" if split else "evaluation"
    if missing:
        notes.append(f"no KL and judge score in {where} (left out): {', '.join(missing)}")
    if not scores:
        raise UserError(
            f"--at-kl: no run has an evaluation with KL and judge scores in {where}/ "
            "(generations.jsonl or summary.json); train with an evaluation block."
        )
    summary_only = [each.run.name for each in scores if not each.per_sample]
    if summary_only:
        notes.append(
            "generations.jsonl without per-sample KL and scores (older runs): summary means "
            f"only, no bootstrap interval for their cells: {', '.join(summary_only)}"
        )
    return scores


def matched_kl_table(
    runs: Sequence[Run],
    targets: Sequence[float],
    baseline: str = "fpo",
    judges: Sequence[str] | None = None,
    bootstrap: int = 2000,
    seed: int = 0,
    split: str | None = None,
    holm_family: int | None = None,
) -> MatchedKL:
    """Each objective's judge scores at the KLs ``targets`` (module docstring).

    Args:
        runs: the runs (`fpo.compare.load_runs`); grouped by ``objective.name`` and seed.
        targets: KLs in nats per completion, the evaluation's own KL estimate.
        baseline: the objective the others are compared with.
        judges: the judges to report (default: every judge that scored a run).
        bootstrap: replicates ``B`` (0: point estimates only).
        seed: the bootstrap's random seed.
        split: ``None`` for the main test set (``evaluation/``), else ``evaluation/<split>``.
        holm_family: the number of differences per judge Holm adjusts over, when the
            comparison names more than the table holds (default: those in the table).
    """
    targets = [float(target) for target in targets]
    if not targets or not all(math.isfinite(target) for target in targets):
        raise UserError(f"--at-kl: give finite target KLs, e.g. 3,6 (got {targets}).")
    if bootstrap < 0:
        raise UserError(f"--bootstrap: replicates must be 0 or more (got {bootstrap}).")
    if holm_family is not None and holm_family < 1:
        raise UserError(f"--holm-family: give a family of 1 or more (got {holm_family}).")
    notes: list[str] = []
    scores = _read(runs, split, notes)
    judges = _judges(scores, judges)
    rng = np.random.default_rng(seed)
    resampled, prompt_sets = _replicate_runs(scores, rng, bootstrap)
    if prompt_sets > 1:
        notes.append(
            f"the runs evaluated {prompt_sets} different prompt sets: each set's prompts are "
            "resampled separately, so differences across sets are not paired by prompt"
        )
    frontiers = _frontiers(scores)
    objectives = sorted(frontiers, key=lambda name: (name != baseline, name))
    if baseline not in frontiers:
        notes.append(f"baseline objective {baseline!r} has no evaluated run: no differences")
    uniform = {name: rng.random((bootstrap, len(frontiers[name]))) for name in objectives}
    cells = {
        (name, judge, target): _cell(frontiers[name], judge, target, resampled, uniform[name])
        for name in objectives
        for judge in judges
        for target in targets
    }
    rows = []
    for (name, judge, target), cell in cells.items():
        if cell is None:
            continue
        row: dict[str, Any] = {column: None for column in COLUMNS}
        row.update(objective=name, judge=judge, target_kl=target, baseline=baseline)
        _score_columns(cell, row, bootstrap)
        base = cells.get((baseline, judge, target))
        if name != baseline and base is not None:
            _difference_columns(cell, base, row)
        rows.append(row)
    for judge in judges:  # one family per judge
        family = [row for row in rows if row["judge"] == judge and row["p_value"] is not None]
        if holm_family is not None and holm_family < len(family):
            raise UserError(
                f"--holm-family {holm_family}: judge {judge!r} has {len(family)} differences "
                "in this table; the family must hold at least those."
            )
        adjusted = holm([row["p_value"] for row in family], holm_family)
        for row, value in zip(family, adjusted, strict=True):
            row["p_holm"] = value
    return MatchedKL(rows, scores, judges, targets, baseline, bootstrap, notes, split, holm_family)
