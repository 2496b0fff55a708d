"""Degeneration metrics and cost at matched KL, beside the judge scores of `fpo.compare.matched`.

A judge's score at a target KL says little if the policy got there by repeating itself or by
stacking praise, and an objective that reaches the KL at twice the compute is not as good a
choice. So the same interpolation runs on run-level numbers:

- ``degeneration/<metric>``: the policy's completions' degeneration metrics of the evaluated
  test set (``summary.json``'s ``degeneration.policy`` block: distinct-1/2, mean length,
  repeat-3, positive-word density and stacking, on-topic rate; `fpo.evaluation.degeneration`);
- ``fit_cpu_seconds`` and ``peak_memory_gb``: the run's training cost (``run/*`` in
  ``metrics.json``); the CPU time only of runs that had the machine to themselves
  (`fpo.machine_load.ran_alone`; older runs that did not record the load count as alone).

Per seed, the value at the target is the linear interpolation between the seed's two runs whose
KLs bracket it (the KL of the same test set); seeds that do not bracket it are left out and
counted, nothing is extrapolated. The cell is the mean over seeds with their standard deviation
(``ddof=1``; none for one seed). No prompt-level interval: these are per-run numbers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fpo.compare.bootstrap import interpolate
from fpo.compare.runs import as_number
from fpo.compare.sample_scores import RunScores, split_summary
from fpo.compare.table import write_csv
from fpo.machine_load import ran_alone

COST_METRICS = {"fit_cpu_seconds": "run/fit_cpu_seconds", "peak_memory_gb": "run/peak_memory_gb"}
COLUMNS = [
    "objective", "metric", "target_kl", "mean", "seed_sd", "n_seeds", "n_seeds_excluded", "note"
]  # fmt: skip


def run_metrics(each: RunScores, split: str | None) -> dict[str, float]:
    """The run's degeneration metrics on ``split`` and its training cost, by metric name."""
    block = (split_summary(each.run, split).get("degeneration") or {}).get("policy") or {}
    found = {f"degeneration/{key}": as_number(value) for key, value in block.items()}
    cost = dict(COST_METRICS)
    if ran_alone(each.run.metrics) is False:  # a shared machine's times measure the sharing
        cost.pop("fit_cpu_seconds")
    found |= {name: as_number(each.run.metrics.get(key)) for name, key in cost.items()}
    return {name: value for name, value in found.items() if value is not None}


def reference_degeneration(scores: Sequence[RunScores], split: str | None) -> dict[str, float]:
    """The reference's completions' degeneration metrics (KL 0): the mean over the runs that
    have them (each run samples the reference with its own seed)."""
    found: dict[str, list[float]] = {}
    for each in scores:
        block = (split_summary(each.run, split).get("degeneration") or {}).get("reference") or {}
        for key, value in block.items():
            if (number := as_number(value)) is not None:
                found.setdefault(f"degeneration/{key}", []).append(number)
    return {key: float(np.mean(values)) for key, values in found.items()}


def matched_run_metrics(
    scores: Sequence[RunScores],
    targets: Sequence[float],
    split: str | None = None,
    baseline: str | None = None,
) -> list[dict[str, Any]]:
    """One row (keys `COLUMNS`) per objective x metric x target: ``baseline`` first, then the
    objectives by name (as in the judge table)."""
    values = [(each, run_metrics(each, split)) for each in scores]
    objectives: dict[str, dict[str, list[tuple[RunScores, dict[str, float]]]]] = {}
    for each, found in values:
        seeds = objectives.setdefault(str(each.run.objective), {})
        seeds.setdefault(str(each.run.seed), []).append((each, found))
    metrics = list(dict.fromkeys(name for _, found in values for name in found))
    rows = []
    for objective in sorted(objectives, key=lambda name: (name != baseline, name)):
        seeds = objectives[objective]
        for metric in metrics:
            for target in targets:
                per_seed = []
                for runs in seeds.values():
                    points = [(e.kl, found[metric]) for e, found in runs if metric in found]
                    if points:
                        kl, value = zip(*points, strict=True)
                        per_seed.append(float(interpolate([kl], [value], target)[0]))
                if not per_seed:
                    continue
                used = [value for value in per_seed if math.isfinite(value)]
                row = dict.fromkeys(COLUMNS)
                row.update(objective=objective, metric=metric, target_kl=float(target))
                row.update(n_seeds=len(used), n_seeds_excluded=len(per_seed) - len(used))
                if used:
                    row["mean"] = float(np.mean(used))
                    row["seed_sd"] = float(np.std(used, ddof=1)) if len(used) > 1 else None
                else:
                    row["note"] = "no seed's runs bracket the target"
                rows.append(row)
    return rows


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Every row, the `COLUMNS` columns; missing values are empty cells."""
    return write_csv(rows, path, COLUMNS)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None or row["mean"] is None:
        return "outside" if row is not None else ""
    sd = "" if row["seed_sd"] is None else f" ± {row['seed_sd']:.3g}"
    return f"{row['mean']:.3g}{sd} ({row['n_seeds']})"


def metrics_markdown(rows: Sequence[dict[str, Any]], reference: dict[str, float]) -> list[str]:
    """A markdown section: one line per objective x target, one column per metric."""
    metrics = list(dict.fromkeys(row["metric"] for row in rows))
    if not metrics:
        return []
    by_key = {(row["objective"], row["target_kl"], row["metric"]): row for row in rows}
    lines = [
        "## Degeneration and cost at matched KL",
        "",
        "Per seed, each number is interpolated at the target KL between the seed's two runs "
        "that bracket it (never extrapolated), then averaged over seeds: `mean ± sd over "
        "seeds (seeds)`; `outside`: no seed brackets the target. Degeneration metrics are the "
        "policy's completions on this test set; cost is the run's training (fit CPU seconds, "
        "peak memory in GB; the CPU seconds only of runs that had the machine to "
        "themselves).",
        "",
        "| objective | KL | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    if reference:
        cells = [f"{reference[m]:.3g}" if m in reference else "" for m in metrics]
        lines.append("| reference (its own samples) | 0 | " + " | ".join(cells) + " |")
    pairs = dict.fromkeys((row["objective"], row["target_kl"]) for row in rows)
    for objective, target in pairs:
        cells = [_cell(by_key.get((objective, target, metric))) for metric in metrics]
        lines.append(f"| {objective} | {target:g} | " + " | ".join(cells) + " |")
    return lines
