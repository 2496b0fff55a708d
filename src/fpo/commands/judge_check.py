"""``fpo-judge-check``: each judge's accuracy on the labelled check set, overall and per
category, as markdown (`fpo.evaluation.judge_check`)::

    fpo-judge-check --judges vader,afinn,smollm2 --out docs/judge_check.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fpo.commands.common import user_errors
from fpo.evaluation.judge_check import DEFAULT_CHECK_SET, KNOWN_JUDGES, judge_check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpo-judge-check",
        description="Each judge's accuracy on a labelled check set, overall and per category.",
    )
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_CHECK_SET, help="check-set JSONL (text, label, "
        f"category); default {DEFAULT_CHECK_SET}"
    )  # fmt: skip
    parser.add_argument(
        "--judges", default="vader,afinn", help=f"comma-separated: {', '.join(KNOWN_JUDGES)} "
        "or dotted judge class paths (built with no arguments)"
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: prints the report; a `UserError` exits with status 2."""
    with user_errors():
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        judges = [name.strip() for name in args.judges.split(",") if name.strip()]
        print(judge_check(args.data, judges, args.out), end="")


if __name__ == "__main__":
    main()
