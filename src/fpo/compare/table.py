"""The comparison table: one row per run, then one per configuration (mean ± stderr over seeds).

A *configuration* is the objective name, its flattened hyperparameters and the overrides
that differ between the runs compared, seed excluded: the runs of one configuration differ
only in their seed. Over those runs each metric gets ``mean`` and
``stderr = std(ddof=1) / sqrt(n)`` (``n`` = runs that have the metric; no stderr for n = 1).

In run rows, ``<metric>_stderr`` is the run's own evaluation standard error (over prompts)
where the evaluation wrote one; in configuration rows it is the standard error over seeds.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.compare.runs import Run, as_number, differing_overrides, flatten

# column -> (key in metrics.json), for training-side metrics.
TRAIN_METRICS = {
    "accuracy": "val/rewards/accuracies",
    "wall_seconds": "run/wall_seconds",
    "fit_cpu_seconds": "run/fit_cpu_seconds",
    "fit_attempts": "run/fit_attempts",
    "fit_load_average": "run/fit_load_average",
    "peak_memory_gb": "run/peak_memory_gb",
    "tokens_per_sec": "train/tokens_per_sec",
}
# column -> (key in evaluation/summary.json, its stderr key); ``eval/<key>`` in
# metrics.json is the fallback.
EVAL_METRICS = {
    "judge_score": ("policy_judge_mean", "policy_judge_stderr"),
    "reference_judge_score": ("reference_judge_mean", "reference_judge_stderr"),
    "win_rate": ("win_rate", "win_rate_stderr"),
    "kl": ("kl", "kl_stderr"),
    "entropy": ("entropy", "entropy_stderr"),
    "preference_accuracy": ("preference_accuracy", "preference_accuracy_stderr"),
    "feature_drift": ("feature_drift", "feature_drift_stderr"),
}
METRIC_COLUMNS = ["accuracy", *EVAL_METRICS, "wall_seconds", "fit_cpu_seconds"]
METRIC_COLUMNS += ["peak_memory_gb", "tokens_per_sec"]
_KNOWN_SUMMARY_KEYS = {key for pair in EVAL_METRICS.values() for key in pair}
_SKIPPED_SUMMARY_BLOCKS = {"settings", "generations", "plot"}
_SKIPPED_EXTRA = {"seed"}  # the run's seed, already a column
EXTRA = "eval:"  # prefix of the columns of other evaluation numbers


def _eval_value(run: Run, key: str) -> float | None:
    value = as_number(run.evaluation.get(key))
    return value if value is not None else as_number(run.metrics.get(f"eval/{key}"))


def _extra_eval(run: Run) -> dict[str, float]:
    """Numbers the standard columns do not cover, as ``eval:<name>`` columns: other numbers
    of summary.json (per-judge blocks flattened: ``eval:judges/afinn/win_rate``) and other
    ``eval/*`` keys of metrics.json. ``X_stderr`` beside ``X_mean`` becomes
    ``X_mean_stderr``, so it pairs with its value."""
    found: dict[str, Any] = {}
    for key, value in run.metrics.items():
        if key.startswith("eval/"):
            found[key[5:]] = value
    for key, value in run.evaluation.items():
        if isinstance(value, dict) and key not in _SKIPPED_SUMMARY_BLOCKS:
            found.update({k.replace(".", "/"): v for k, v in flatten(value, key).items()})
        elif key not in _SKIPPED_SUMMARY_BLOCKS:
            found[key] = value
    extra: dict[str, float] = {}
    for key, value in found.items():
        number = as_number(value)
        if number is None or key in _KNOWN_SUMMARY_KEYS or key in _SKIPPED_EXTRA:
            continue
        base = key.removesuffix("_stderr")
        if key != base and f"{base}_mean" in found:
            key = f"{base}_mean_stderr"
        extra[EXTRA + key] = number
    return extra


def _judge_name(run: Run) -> str | None:
    settings = run.evaluation.get("settings")
    name = run.evaluation.get("judge")
    if name is None and isinstance(settings, dict):
        name = settings.get("judge")
    return None if name is None else str(name)


def _label(objective: str | None, params: dict[str, Any]) -> str:
    parts = [f"{key.removeprefix('objective.')}={value}" for key, value in params.items()]
    return " ".join([objective or "?", *parts])


def run_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One dict per run: identity columns, hyperparameters, metrics and their stderrs."""
    varying = differing_overrides(runs)
    rows = []
    for run in runs:
        params = dict(sorted(run.hyperparameters.items()))
        params.update({key: run.overrides.get(key) for key in varying})
        row: dict[str, Any] = {
            "level": "run",
            "config": _label(run.objective, params),
            "run": run.name,
            "objective": run.objective,
            **params,
            "seed": run.seed,
            "n": 1,
            "judge": _judge_name(run),
        }
        for column, key in TRAIN_METRICS.items():
            row[column] = as_number(run.metrics.get(key))
            row[f"{column}_stderr"] = None
        for column, (key, stderr_key) in EVAL_METRICS.items():
            row[column] = _eval_value(run, key)
            row[f"{column}_stderr"] = _eval_value(run, stderr_key)
        row.update(_extra_eval(run))
        rows.append(row)
    return rows


def mean_stderr(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and ``std(ddof=1) / sqrt(n)``; ``(None, None)`` for no values, no stderr for one."""
    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _value_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The metric columns, then the extra evaluation columns in first-seen order (an
    ``X_stderr`` column goes with ``X`` when there is one, else it is a value itself)."""
    extra = list(dict.fromkeys(k for row in rows for k in row if k.startswith(EXTRA)))
    paired = {f"{k}_stderr" for k in extra}
    return [*METRIC_COLUMNS, *(k for k in extra if k not in paired)]


def config_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration (run rows grouped by ``config``), first-seen order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["config"], []).append(row)
    identity = [c for c in columns(rows) if c not in ("level", "run", "seed", "n", "judge")]
    identity = [c for c in identity if c not in _value_columns(rows) and not c.endswith("_stderr")]
    result = []
    for label, members in groups.items():
        first = members[0]
        judges = sorted({str(m["judge"]) for m in members if m.get("judge") is not None})
        row: dict[str, Any] = {key: first.get(key) for key in identity}
        row.update(level="config", config=label, run=None, n=len(members))
        row["seed"] = ",".join(str(m["seed"]) for m in members)
        row["judge"] = ",".join(judges) or None
        for column in _value_columns(rows):
            values = [m[column] for m in members if m.get(column) is not None]
            row[column], row[f"{column}_stderr"] = mean_stderr(values)
        result.append(row)
    return result


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Every column in a stable order: identity, hyperparameters, metric/stderr pairs."""
    head = ["level", "config", "run", "objective"]
    tail = ["seed", "n", "judge"]
    values = _value_columns(rows)
    known = set(head) | set(tail) | set(values) | {f"{v}_stderr" for v in values}
    params = [k for row in rows for k in row if k not in known and not k.startswith(EXTRA)]
    params = list(dict.fromkeys(params))
    params = sorted(p for p in params if p.startswith("objective.")) + [
        p for p in params if not p.startswith("objective.")
    ]
    return [*head, *params, *tail, *(c for v in values for c in (v, f"{v}_stderr"))]


def write_csv(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    fieldnames: Sequence[str] | None = None,
) -> Path:
    """All rows, every column (or only ``fieldnames``, in that order); missing values are
    empty cells."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as handle:
        names = columns(rows) if fieldnames is None else list(fieldnames)
        writer = csv.DictWriter(handle, fieldnames=names, restval="", extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return path
