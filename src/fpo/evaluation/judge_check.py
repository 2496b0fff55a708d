"""``fpo-judge-check``: each judge's accuracy on the labelled check set, per category.

The check set (``data/judge_check/check_set.jsonl``, its labelling rule in the README
beside it) holds short texts with a ``label`` (``positive``, ``negative`` or ``gamed``) and
a ``category`` (plain reviews, negated praise, sarcasm, stacked adjectives, ad copy, ...).
Each judge scores every text on its own (an empty prompt); its verdict is *positive* when
the score is above the judge's ``positive_threshold`` (0 when it has none: the sign of a
lexicon score). A verdict is correct when it is positive exactly for the ``positive``
texts, so a judge that calls a stack of adjectives or a hotel advert positive is wrong
there: the table shows which kind of text fools which judge.

    fpo-judge-check --judges vader,afinn,smollm2 --out docs/judge_check.md
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import get_class

from fpo.errors import UserError
from fpo.locations import files_root

#: The shipped check set (the checkout's data/, or its copy in an installed wheel).
DEFAULT_CHECK_SET = files_root() / "data" / "judge_check" / "check_set.jsonl"
LABELS = ("positive", "negative", "gamed")
MARKERS = ("<!-- fpo-judge-check: start -->", "<!-- fpo-judge-check: end -->")
# --judges names -> (judge class, its arguments); a dotted class path works as well.
KNOWN_JUDGES: dict[str, tuple[str, dict[str, Any]]] = {
    "vader": ("fpo.evaluation.judges.VaderJudge", {}),
    "afinn": ("fpo.evaluation.judges.AfinnJudge", {}),
    "smollm2": ("fpo.evaluation.instruct_judge.InstructLMJudge", {}),
    "smollm2-sentiment": (
        "fpo.evaluation.instruct_judge.InstructLMJudge",
        {"ask_topic": False, "name": "smollm2-135m-instruct-sentiment-only"},
    ),
}


def read_check_set(path: str | Path) -> list[dict[str, str]]:
    """The rows of a check-set JSONL file; each needs ``text``, ``label`` (in `LABELS`) and
    ``category``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--data: {path} does not exist (the check set, a JSONL file).")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, label, category = row["text"], row["label"], row["category"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(
                f"{path} line {number}: needs text, label, category ({error})"
            ) from None
        if label not in LABELS:
            raise UserError(f"{path} line {number}: label {label!r} is not one of {LABELS}")
        rows.append({"text": str(text), "label": label, "category": str(category)})
    if not rows:
        raise UserError(f"{path}: no rows")
    return rows


def check_judge(judge: Any, rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """One judge on the check set: ``accuracy`` (all texts), ``reviews`` (texts labelled
    positive or negative), ``gamed``, ``categories`` (accuracy per category, in file
    order), ``mean_score`` per category and ``seconds_per_text`` (scoring only)."""
    texts = [row["text"] for row in rows]
    started = time.perf_counter()
    scores = [float(s) for s in judge.score([""] * len(texts), texts)]
    seconds = (time.perf_counter() - started) / len(texts)
    threshold = float(getattr(judge, "positive_threshold", 0.0))
    correct = [
        (s > threshold) == (r["label"] == "positive") for s, r in zip(scores, rows, strict=True)
    ]

    def mean_where(values: Sequence[float | bool], keep) -> float | None:
        kept = [float(v) for v, row in zip(values, rows, strict=True) if keep(row)]
        return statistics.fmean(kept) if kept else None

    categories = list(dict.fromkeys(row["category"] for row in rows))

    def per_category(values: Sequence[float | bool]) -> dict[str, float | None]:
        return {c: mean_where(values, lambda r, c=c: r["category"] == c) for c in categories}

    return {
        "judge": str(getattr(judge, "name", type(judge).__name__)),
        "threshold": threshold,
        "accuracy": mean_where(correct, lambda row: True),
        "reviews": mean_where(correct, lambda row: row["label"] != "gamed"),
        "gamed": mean_where(correct, lambda row: row["label"] == "gamed"),
        "categories": {
            c: mean_where(correct, lambda r, c=c: r["category"] == c) for c in categories
        },
        "mean_score": {
            c: mean_where(scores, lambda r, c=c: r["category"] == c) for c in categories
        },
        "seconds_per_text": seconds,
    }


def _cell(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_report(results: Sequence[dict[str, Any]], rows: Sequence[dict[str, str]]) -> str:
    """Two markdown tables: accuracy (overall and per category) and mean score per category."""
    categories = list(results[0]["categories"])
    counts = {c: sum(row["category"] == c for row in rows) for c in categories}
    labels = {c: "/".join(dict.fromkeys(r["label"] for r in rows if r["category"] == c))
              for c in categories}  # fmt: skip
    head = [f"{c} ({labels[c]}, {counts[c]})" for c in categories]
    lines = [
        f"Accuracy on {len(rows)} texts (verdict: score above the threshold = positive).",
        "",
        "| judge | threshold | all | reviews | gamed | " + " | ".join(head) + " | s/text |",
        "|---|" + "---|" * (len(head) + 5),
    ]
    for result in results:
        cells = [_cell(result[key]) for key in ("accuracy", "reviews", "gamed")]
        cells += [_cell(result["categories"][c]) for c in categories]
        lines.append(
            f"| {result['judge']} | {result['threshold']:g} | "
            + " | ".join(cells)
            + f" | {result['seconds_per_text']:.4f} |"
        )
    lines += [
        "",
        "Mean score per category (each judge on its own scale).",
        "",
        "| judge | " + " | ".join(categories) + " |",
        "|---|" + "---|" * len(categories),
    ]
    for result in results:
        cells = [_cell(result["mean_score"][c], 3) for c in categories]
        lines.append(f"| {result['judge']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def build_judge(name: str) -> Any:
    """A judge from a `KNOWN_JUDGES` name or a dotted class path (built with no arguments)."""
    target, kwargs = KNOWN_JUDGES.get(name, (name, {}))
    try:
        return get_class(target)(**kwargs)
    except (ImportError, ValueError) as error:
        raise UserError(
            f"--judges: {name!r} is neither one of {sorted(KNOWN_JUDGES)} nor an importable "
            f"judge class ({error})"
        ) from None


def write_report(report: str, out: str | Path) -> None:
    """Write ``report`` to ``out``; in a file that has the `MARKERS` lines, only between
    them (the prose around the tables is kept)."""
    out = Path(out)
    start, end = MARKERS
    old = out.read_text(encoding="utf-8") if out.is_file() else ""
    if start in old and end in old.split(start, 1)[1]:
        head, rest = old.split(start, 1)
        report = f"{head}{start}\n{report}{end}{rest.split(end, 1)[1]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report, encoding="utf-8")


def judge_check(data: str | Path, judges: Sequence[str], out: str | Path | None = None) -> str:
    """Every judge of ``judges`` (names, `build_judge`) on the check set ``data``: the
    markdown report (`markdown_report`), also written to ``out`` when given
    (`write_report`)."""
    rows = read_check_set(data)
    report = markdown_report([check_judge(build_judge(name), rows) for name in judges], rows)
    if out is not None:
        write_report(report, out)
    return report
