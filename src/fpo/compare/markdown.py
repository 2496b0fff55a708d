"""``comparison.md``: the run table and the configuration table, blanks for missing values."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.compare.table import EXTRA, columns

_IDENTITY = {"level", "config", "n"}


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def _cell(row: dict[str, Any], column: str, seeds: bool) -> str:
    """``value``, ``value ± stderr``; over seeds a single run shows ``value ± -``."""
    value = row.get(column)
    if value is None:
        return ""
    if f"{column}_stderr" not in row or not isinstance(value, float):
        return _number(value)
    stderr = row.get(f"{column}_stderr")
    if stderr is None:
        return f"{_number(value)} ± -" if seeds else _number(value)
    return f"{_number(value)} ± {_number(stderr)}"


def _table(rows: Sequence[dict[str, Any]], leading: list[str], seeds: bool) -> list[str]:
    """A markdown table of the columns that have a value in at least one row."""
    if not rows:
        return ["(none)"]
    shown = [c for c in columns(rows) if c not in _IDENTITY and not c.endswith("_stderr")]
    shown = [c for c in shown if not c.startswith(EXTRA)]
    shown = [*leading, *(c for c in shown if c not in leading)]
    shown = [c for c in shown if any(row.get(c) not in (None, "") for row in rows)]
    header = [c.removeprefix("objective.") for c in shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(shown)]
    for row in rows:
        cells = [_cell(row, c, seeds).replace("|", "\\|") for c in shown]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(
    runs: Sequence[dict[str, Any]], configs: Sequence[dict[str, Any]], path: str | os.PathLike
) -> Path:
    """Write the two tables (columns empty in every row are left out; other evaluation
    numbers, the ``eval:*`` columns, are only named: they are in comparison.csv)."""
    extra = [c for c in columns(runs) if c.startswith(EXTRA) and not c.endswith("_stderr")]
    extra = [c for c in extra if any(row.get(c) is not None for row in runs)]
    more = f"More evaluation columns in comparison.csv: {', '.join(extra)}." if extra else ""
    lines = [
        "# Comparison",
        "",
        "## Runs",
        "",
        "`±` is the run's evaluation standard error over prompts, where it has one.",
        "",
        *_table(runs, ["run"], seeds=False),
        "",
        "## Configurations",
        "",
        "Mean ± standard error over seeds (sample std / sqrt(n); `-` when n = 1).",
        "",
        *_table(configs, ["config", "n"], seeds=True),
        "",
        *([more, ""] if more else []),
    ]
    path = Path(path)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
