"""`compare`: every table and figure of a comparison of runs, written into one folder."""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.compare.markdown import write_markdown
from fpo.compare.matched import MatchedKL, matched_kl_table
from fpo.compare.matched_metrics import (
    matched_run_metrics,
    metrics_markdown,
    reference_degeneration,
    write_metrics_csv,
)
from fpo.compare.matched_report import write_matched_csv, write_matched_markdown
from fpo.compare.plots import plot_curves, plot_frontier
from fpo.compare.runs import SUMMARY, Run, load_runs
from fpo.compare.table import config_rows, run_rows, write_csv


def frontier_rows(
    matched: MatchedKL, judge: str, rows: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Run rows for the frontier plot from the scores the matched table used (``judge``; the
    split it read), each with its configuration label from the comparison's run rows."""
    config_of = {row["run"]: row["config"] for row in rows}
    return [
        {
            "level": "run",
            "config": config_of[each.run.name],
            "run": each.run.name,
            "objective": each.run.objective,
            "seed": each.run.seed,
            "n": 1,
            "judge": judge,
            "kl": each.kl,
            "judge_score": each.scores[judge],
        }
        for each in matched.scores
        if judge in each.scores
    ]


def _judge_frontier(
    matched: MatchedKL, judge: str, rows: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """``judge``'s frontier plot data: its run rows, their configuration rows and its
    matched-KL rows."""
    plotted = frontier_rows(matched, judge, rows)
    return plotted, config_rows(plotted), [row for row in matched.rows if row["judge"] == judge]


def no_frontier_reason(runs: Sequence[Run], matched: bool = False) -> str:
    """Why the judge-vs-KL frontier has no point: which runs lack an evaluation, and the
    command that gives them one."""
    missing = [run for run in runs if not run.evaluation]
    given = shlex.quote(f"run_dir={missing[0].path}") if missing else ""
    example = f"fpo-eval {given} evaluation=smoke" if missing else ""
    if len(missing) == len(runs):
        return (
            f"no frontier.png: none of the {len(runs)} runs was evaluated (no "
            f"{SUMMARY}: they were trained without an evaluation block). Evaluate each run, "
            f"e.g. {example} (or evaluation=sentiment), or train with evaluation=..., then "
            "compare again."
        )
    what = "judge scores at the KLs of --at-kl" if matched else "a judge score and a KL"
    return (
        f"no frontier.png: no evaluated run has {what} ({len(missing)} of {len(runs)} runs "
        f"have no {SUMMARY}; evaluate them with e.g. {example or 'fpo-eval run_dir=<run>'})."
    )


def compare(
    directories: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    at_kl: Sequence[float] = (),
    **matched_options: Any,
) -> dict[str, Any]:
    """Read every run under ``directories`` and write the comparison into ``out``.

    With ``at_kl`` (target KLs) also ``matched_kl.csv`` and ``matched_kl.md``
    (`fpo.compare.matched.matched_kl_table`, given ``matched_options``: ``baseline``,
    ``judges``, ``bootstrap``, ``seed``, ``split``, ``holm_family``),
    ``matched_kl_metrics.csv`` (degeneration and cost at the same KLs,
    `fpo.compare.matched_metrics`, also a section of the markdown),
    and the frontier plot shows the first judge's runs and matched estimates
    (``frontier_<judge>.png`` each other judge's).

    Returns ``{"runs", "configurations", "files", "frontier", "curves", "notes"}``:
    counts, the paths written, whether each figure has data, and notes for the user
    (plus ``"matched"``, the `MatchedKL`, with ``at_kl``).
    """
    runs = load_runs(directories)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run_rows(runs)
    configs = config_rows(rows)
    files = {
        "csv": write_csv([*rows, *configs], out / "comparison.csv"),
        "markdown": write_markdown(rows, configs, out / "comparison.md"),
        "frontier": out / "frontier.png",
        "curves": out / "curves.png",
    }
    notes = [problem for run in runs for problem in run.problems]
    plotted, plotted_configs, matched_rows, matched = rows, configs, [], None
    if at_kl:
        matched = matched_kl_table(runs, at_kl, **matched_options)
        files["matched_csv"] = write_matched_csv(matched, out / "matched_kl.csv")
        metrics = matched_run_metrics(matched.scores, at_kl, matched.split, matched.baseline)
        files["matched_metrics_csv"] = write_metrics_csv(metrics, out / "matched_kl_metrics.csv")
        section = metrics_markdown(metrics, reference_degeneration(matched.scores, matched.split))
        files["matched_markdown"] = write_matched_markdown(matched, out / "matched_kl.md", section)
        notes += matched.notes
        judge = matched.judges[0]
        plotted, plotted_configs, matched_rows = _judge_frontier(matched, judge, rows)
        for other in matched.judges[1:]:  # the first judge's is frontier.png
            judge_rows, judge_configs, judge_matched = _judge_frontier(matched, other, rows)
            path = out / f"frontier_{other}.png"
            if plot_frontier(judge_configs, path, judge_rows, at_kl, judge_matched):
                files[f"frontier_{other}"] = path
    has_frontier = plot_frontier(plotted_configs, files["frontier"], plotted, at_kl, matched_rows)
    if not has_frontier:
        notes.append(no_frontier_reason(runs, matched=bool(at_kl)))
        del files["frontier"]
    has_curves = plot_curves(runs, files["curves"])
    if not has_curves:
        notes.append("no curves.png: no run has a CSV logger file (csv/version_*/metrics.csv)")
        del files["curves"]
    result = {
        "runs": len(runs),
        "configurations": len(configs),
        "files": files,
        "frontier": has_frontier,
        "curves": has_curves,
        "notes": notes,
    }
    return result if matched is None else {**result, "matched": matched}
