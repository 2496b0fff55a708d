"""Comparing runs of a sweep: ``fpo-compare DIR [DIR ...] --out OUT``.

- `runs`: find run folders (``.hydra/config.yaml``) and read them into `Run`.
- `table`: one row per run and per configuration (mean ± stderr over seeds), CSV.
- `markdown`: the same tables as markdown.
- `plots`: the judge-vs-KL frontier and the training curves.
- `matched` (with `samples`, `bootstrap`, `matched_report`): each objective's judge scores
  at target KLs, interpolated per seed, with two-level bootstrap intervals and differences
  from a baseline objective (``fpo-compare --at-kl``).
- `report`: `compare`, everything above written into one folder (``fpo-compare`` is
  `fpo.commands.compare`).
"""

from fpo.compare.markdown import write_markdown
from fpo.compare.matched import MatchedKL, matched_kl_table
from fpo.compare.matched_report import write_matched_csv, write_matched_markdown
from fpo.compare.plots import mean_curves, plot_curves, plot_frontier, read_curves
from fpo.compare.report import compare, no_frontier_reason
from fpo.compare.runs import Run, find_runs, load_run, load_runs, newest_sweep
from fpo.compare.table import config_rows, mean_stderr, run_rows, write_csv

__all__ = [
    "MatchedKL",
    "Run",
    "compare",
    "config_rows",
    "find_runs",
    "load_run",
    "load_runs",
    "matched_kl_table",
    "mean_curves",
    "mean_stderr",
    "newest_sweep",
    "no_frontier_reason",
    "plot_curves",
    "plot_frontier",
    "read_curves",
    "run_rows",
    "write_csv",
    "write_markdown",
    "write_matched_csv",
    "write_matched_markdown",
]
