"""``frontier.png`` (judge score vs KL per configuration) and ``curves.png`` (training curves).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot state, no display).
When there is nothing to draw, a placeholder figure with a note is written instead and
the function returns ``False``.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fpo.compare.runs import Run

CURVES = {
    "train/loss": "loss",
    "train/rewards/margins": "reward margin",
    "train/rewards/accuracies": "reward accuracy",
}


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _colours(objectives: Sequence[str]) -> dict[str, Any]:
    """One tab10 colour per objective, stable (sorted names)."""
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {name: palette(i % 10) for i, name in enumerate(sorted(set(objectives)))}


def _placeholder(path: Path, title: str, note: str) -> None:
    figure = _figure(6, 3)
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title)
    axes.text(0.5, 0.5, note, ha="center", va="center", wrap=True, fontsize=10)
    figure.savefig(path, format="png")


def plot_frontier(configs: Sequence[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Judge score vs KL(policy || reference), one point per configuration with error bars
    (stderr over seeds), one colour per objective; the reference at KL 0 in grey."""
    path = Path(path)
    points = [c for c in configs if c.get("judge_score") is not None and c.get("kl") is not None]
    if not points:
        _placeholder(
            path,
            "judge score vs KL",
            "No run has evaluation values (judge score and KL).\n"
            "Train with an evaluation block (e.g. evaluation=sentiment) to fill this plot.",
        )
        return False
    colours = _colours([str(c["objective"]) for c in points])
    figure = _figure(6.5, 4.5)
    axes = figure.add_subplot()
    references = [
        c["reference_judge_score"] for c in configs if c.get("reference_judge_score") is not None
    ]
    if references:
        axes.scatter([0.0], [sum(references) / len(references)], marker="s", color="grey")
        axes.annotate("reference", (0.0, sum(references) / len(references)), fontsize=7)
    labelled = set()
    parts = {id(c): str(c["config"]).split()[1:] for c in points}
    shared = {}  # per objective, the "key=value" parts all its points have: not annotated
    for config in points:
        mine = set(parts[id(config)])
        objective = str(config["objective"])
        shared[objective] = shared.get(objective, mine) & mine
    for config in points:
        objective = str(config["objective"])
        axes.errorbar(
            [config["kl"]],
            [config["judge_score"]],
            xerr=[config.get("kl_stderr") or 0.0],
            yerr=[config.get("judge_score_stderr") or 0.0],
            fmt="o",
            capsize=3,
            color=colours[objective],
            label=None if objective in labelled else objective,
        )
        labelled.add(objective)
        detail = " ".join(p for p in parts[id(config)] if p not in shared[objective])
        if detail:
            axes.annotate(detail, (config["kl"], config["judge_score"]), fontsize=6, alpha=0.7)
    judges = sorted({str(c["judge"]) for c in points if c.get("judge")})
    axes.set_xlabel("KL(policy || reference), nats per completion")
    axes.set_ylabel(f"judge score ({', '.join(judges) or 'judge'})")
    axes.set_title("judge score vs KL (mean ± stderr over seeds)")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True


def read_curves(path: str | os.PathLike) -> dict[str, dict[int, float]]:
    """``{metric: {step: value}}`` from a CSV logger file (the train metrics of `CURVES`;
    a ``<metric>_step`` column counts when Lightning logged both step and epoch values)."""
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            step = record.get("step")
            if not step:
                continue
            for metric in CURVES:
                value = record.get(metric) or record.get(f"{metric}_step")
                if value:
                    curves[metric][int(float(step))] = float(value)
    return dict(curves)


def mean_curves(runs: Sequence[Run]) -> dict[str, dict[str, dict[int, float]]]:
    """``{objective: {metric: {step: mean over that objective's runs}}}``."""
    collected: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for run in runs:
        if run.curves is None:
            continue
        for metric, points in read_curves(run.curves).items():
            for step, value in points.items():
                collected[str(run.objective)][metric][step].append(value)
    return {
        objective: {
            metric: {step: sum(v) / len(v) for step, v in sorted(points.items())}
            for metric, points in metrics.items()
        }
        for objective, metrics in collected.items()
    }


def plot_curves(runs: Sequence[Run], path: str | os.PathLike) -> bool:
    """Loss, reward margin and accuracy per training step, one line per objective."""
    path = Path(path)
    curves = mean_curves(runs)
    if not curves:
        _placeholder(path, "training curves", "No run has a CSV logger file (csv/version_*).")
        return False
    colours = _colours(list(curves))
    figure = _figure(4 * len(CURVES), 3.4)
    for i, (metric, title) in enumerate(CURVES.items()):
        axes = figure.add_subplot(1, len(CURVES), i + 1)
        for objective, metrics in sorted(curves.items()):
            points = metrics.get(metric)
            if points:
                steps, values = list(points), list(points.values())
                axes.plot(steps, values, label=objective, color=colours[objective])
        axes.set_title(f"{title} (train)")
        axes.set_xlabel("step")
        if axes.lines:
            axes.legend(fontsize=7)
        else:
            axes.text(0.5, 0.5, f"{metric} not logged", ha="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return True
