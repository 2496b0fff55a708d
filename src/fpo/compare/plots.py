"""``frontier.png`` (judge score vs KL: runs, seeds, configurations, matched-KL estimates)
and ``curves.png`` (training curves).

Figures are drawn with matplotlib's Agg canvas directly (no pyplot state, no display).
When there is nothing to draw, no figure is written (an old one at that path is removed)
and the function returns ``False``; `fpo.compare.report.no_frontier_reason` says why.
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


def _nothing_to_draw(path: Path) -> bool:
    """No figure: remove an old one at ``path`` (from an earlier comparison); ``False``."""
    path.unlink(missing_ok=True)
    return False


def _seed_lines(axes: Any, rows: Sequence[dict[str, Any]], colours: dict[str, Any]) -> None:
    """Every run as a small point; one seed's runs of one objective joined in KL order."""
    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row.get("judge_score") is not None and row.get("kl") is not None:
            lines[(str(row["objective"]), str(row.get("seed")))].append(row)
    for (objective, _), members in lines.items():
        members = sorted(members, key=lambda row: row["kl"])
        kls, scores = [m["kl"] for m in members], [m["judge_score"] for m in members]
        axes.plot(kls, scores, "o-", color=colours.get(objective, "grey"), alpha=0.35, lw=0.8, ms=3)


def _matched_points(axes: Any, matched: Sequence[dict[str, Any]], colours: dict[str, Any]) -> None:
    """The matched-KL estimates with their intervals, objectives side by side at each target."""
    found = [row for row in matched if row.get("score") is not None]
    objectives = sorted({str(row["objective"]) for row in found})
    low, high = axes.get_xlim()
    step = 0.012 * (high - low)
    for row in found:
        shift = (objectives.index(str(row["objective"])) - (len(objectives) - 1) / 2) * step
        error = None
        if row.get("score_low") is not None:
            error = [[row["score"] - row["score_low"]], [row["score_high"] - row["score"]]]
        axes.errorbar(
            [row["target_kl"] + shift], [row["score"]], yerr=error, fmt="D", ms=5, capsize=3,
            color=colours.get(str(row["objective"]), "grey"), markeredgecolor="black",
        )  # fmt: skip


def frontier_figure(
    configs: Sequence[dict[str, Any]],
    rows: Sequence[dict[str, Any]] = (),
    targets: Sequence[float] = (),
    matched: Sequence[dict[str, Any]] = (),
) -> Figure | None:
    """Judge score vs KL(policy || reference), one colour per objective: each configuration's
    mean with error bars (stderr over seeds), joined in KL order (the objective's mean
    frontier); with ``rows`` (run rows), every run too, each seed's runs joined; ``targets``
    as vertical lines and ``matched`` (`fpo.compare.matched` rows of one judge) as diamonds
    with their 95% intervals. The reference at KL 0 in grey. ``None`` with no data."""
    points = [c for c in configs if c.get("judge_score") is not None and c.get("kl") is not None]
    if not points:
        return None
    colours = _colours([str(c["objective"]) for c in points])
    figure = _figure(7, 4.8)
    axes = figure.add_subplot()
    references = [
        c["reference_judge_score"] for c in configs if c.get("reference_judge_score") is not None
    ]
    if references:
        axes.scatter([0.0], [sum(references) / len(references)], marker="s", color="grey")
        axes.annotate("reference", (0.0, sum(references) / len(references)), fontsize=7)
    _seed_lines(axes, rows, colours)
    for objective in sorted(colours):
        mine = [c for c in points if str(c["objective"]) == objective]
        mine = sorted(mine, key=lambda c: c["kl"])
        seeds = max(int(c.get("n") or 1) for c in mine)
        axes.errorbar(
            [c["kl"] for c in mine],
            [c["judge_score"] for c in mine],
            xerr=[c.get("kl_stderr") or 0.0 for c in mine],
            yerr=[c.get("judge_score_stderr") or 0.0 for c in mine],
            fmt="o-",
            lw=2,
            capsize=3,
            color=colours[objective],
            label=f"{objective} ({seeds} seed{'s' if seeds > 1 else ''})",
        )
    for i, target in enumerate(targets):
        axes.axvline(target, color="grey", ls="--", lw=1, label="target KL" if i == 0 else None)
    _matched_points(axes, matched, colours)
    judges = sorted({str(c["judge"]) for c in points if c.get("judge")})
    axes.set_xlabel("KL(policy || reference), nats per completion")
    axes.set_ylabel(f"judge score ({', '.join(judges) or 'judge'})")
    title = ["thick: mean per configuration ± stderr over seeds"]
    title += ["thin: each seed's runs"] if rows else []
    title += ["diamonds: score at the target KL, 95% interval"] if matched else []
    axes.set_title("judge score vs KL\n" + "; ".join(title[:2]) + "\n" * (len(title) > 2)
                   + "".join(title[2:]), fontsize=8)  # fmt: skip
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_frontier(
    configs: Sequence[dict[str, Any]],
    path: str | os.PathLike,
    rows: Sequence[dict[str, Any]] = (),
    targets: Sequence[float] = (),
    matched: Sequence[dict[str, Any]] = (),
) -> bool:
    """Write `frontier_figure` to ``path``; ``False``, and no file, with no data."""
    path = Path(path)
    figure = frontier_figure(configs, rows, targets, matched)
    if figure is None:
        return _nothing_to_draw(path)
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
    """Loss, reward margin and accuracy per training step, one line per objective;
    ``False``, and no file, when no run has a CSV logger file."""
    path = Path(path)
    curves = mean_curves(runs)
    if not curves:
        return _nothing_to_draw(path)
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
