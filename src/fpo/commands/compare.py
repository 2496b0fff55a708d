"""``fpo-compare DIR [DIR ...] --out OUT``: compare the runs of one or more sweeps.

Writes ``comparison.csv``, ``comparison.md``, ``frontier.png`` and ``curves.png`` into
``OUT`` and prints the configuration table's size and any notes (missing files,
placeholder figures). A folder with no runs is a user error (exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fpo.commands.common import user_errors
from fpo.compare.report import compare


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
