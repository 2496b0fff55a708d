"""``fpo-compare DIR [DIR ...] --out OUT``: compare the runs of one or more sweeps.

Writes ``comparison.csv``, ``comparison.md``, ``frontier.png`` and ``curves.png`` into
``OUT`` and prints the configuration table's size and any notes (missing files,
placeholder figures). A folder with no runs is a user error (exit status 2).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.cli import user_errors
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpo-compare",
        description=(
            "Compare fpo-train runs: a table per run and per configuration (mean ± stderr "
            "over seeds), the judge-vs-KL frontier and the training curves."
        ),
    )
    parser.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="run or multirun folders (logs/<task>/runs/<time>, logs/<task>/multiruns/<time>)",
    )
    parser.add_argument("--out", required=True, help="folder to write the comparison into")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with user_errors():
        result = compare(args.dirs, args.out)
    for note in result["notes"]:
        print(f"note: {note}")
    print(
        f"compared {result['runs']} runs in {result['configurations']} configurations; "
        f"wrote {', '.join(str(p) for p in result['files'].values())}"
    )


if __name__ == "__main__":
    main()
