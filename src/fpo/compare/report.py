"""`compare`: every table and figure of a comparison of runs, written into one folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.compare.markdown import write_markdown
from fpo.compare.plots import plot_curves, plot_frontier
from fpo.compare.runs import load_runs
from fpo.compare.table import config_rows, run_rows, write_csv


def compare(directories: Sequence[str | os.PathLike], out: str | os.PathLike) -> dict[str, Any]:
    """Read every run under ``directories`` and write the comparison into ``out``.

    Returns ``{"runs", "configurations", "files", "frontier", "curves", "notes"}``:
    counts, the paths written, whether each figure has data, and notes for the user.
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
    has_frontier = plot_frontier(configs, files["frontier"])
    if not has_frontier:
        notes.append(
            "no run has evaluation values (judge score and KL): frontier.png is a placeholder"
        )
    has_curves = plot_curves(runs, files["curves"])
    if not has_curves:
        notes.append("no run has a CSV logger file: curves.png is a placeholder")
    return {
        "runs": len(runs),
        "configurations": len(configs),
        "files": files,
        "frontier": has_frontier,
        "curves": has_curves,
        "notes": notes,
    }
