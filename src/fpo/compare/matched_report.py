"""``matched_kl.csv`` and ``matched_kl.md``: the matched-KL table (`fpo.compare.matched`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.compare.matched import COLUMNS, MatchedKL
from fpo.compare.table import write_csv


def write_matched_csv(result: MatchedKL, path: str | os.PathLike) -> Path:
    """Every row, every `COLUMNS` column; missing values are empty cells."""
    return write_csv(result.rows, path, COLUMNS)


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _with_interval(row: dict[str, Any], key: str) -> str:
    """``0.512 [0.48, 0.54]``; the value alone when there is no interval."""
    value = _number(row[key])
    if row.get(f"{key}_low") is None:
        return value
    return f"{value} [{_number(row[f'{key}_low'])}, {_number(row[f'{key}_high'])}]"


def _seeds(row: dict[str, Any]) -> str:
    excluded = row["n_seeds_excluded"]
    return f"{row['n_seeds']}" + (f" ({excluded} not bracketing)" if excluded else "")


def _holm_text(result: MatchedKL) -> str:
    if result.holm_family is None:
        return "Holm-adjusted over every difference of the same judge in this table."
    return (
        f"Holm-adjusted per judge over a family of {result.holm_family} differences: those "
        "with a p-value in this table, and the rest of the family (named by the comparison "
        "but without a value here) counted as p = 1."
    )


def write_matched_markdown(
    result: MatchedKL, path: str | os.PathLike, sections: Sequence[str] = ()
) -> Path:
    """One table (objective x judge x target) with intervals, differences and p-values, then
    ``sections`` (markdown lines, e.g. `fpo.compare.matched_metrics.metrics_markdown`)."""
    base = result.baseline
    lines = [
        "# Judge scores at matched KL",
        "",
        "Per seed, the score is interpolated linearly at the target KL between the two runs "
        "of that seed's frontier that bracket it, then averaged over the seeds (`seeds`; "
        "seeds whose runs do not bracket the target are left out and counted). Nothing is "
        "extrapolated.",
        "",
        f"Intervals: 95% percentile intervals of a two-level bootstrap ({result.replicates} "
        "replicates: seeds drawn with replacement, then the evaluated prompts drawn with "
        "replacement, each run's mean KL and score recomputed and re-interpolated). "
        f"`Δ vs {base}`: the objective's score minus {base}'s at the same KL and judge, "
        "with its interval; `p`: two-sided bootstrap p-value of no difference, "
        "2 min(P(Δ ≤ 0), P(Δ ≥ 0)); `< x` means below the bootstrap's resolution 1/B; "
        f"`p (Holm)`: {_holm_text(result)}",
        "",
        f"| objective | judge | KL | score [95% CI] | seeds | Δ vs {base} [95% CI] | p | p (Holm) "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result.rows:
        outside = row["score"] is None
        cells = [
            row["objective"],
            row["judge"],
            f"{row['target_kl']:g}",
            row["note"] if outside else _with_interval(row, "score"),
            _seeds(row),
            _with_interval(row, "diff") if row["diff"] is not None else "",
            row["p_value_text"] or "",
            _number(row["p_holm"]),
            "" if outside else row["note"] or "",
        ]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    if sections:
        lines += ["", *sections]
    if result.notes:
        lines += ["", "Notes:", "", *(f"- {note}" for note in result.notes)]
    path = Path(path)
    path.write_text("\n".join([*lines, ""]), encoding="utf-8")
    return path
