"""``fpo-compare DIR [DIR ...] --out OUT [--at-kl 3,6 ...]``: compare the runs of sweeps.

Writes ``comparison.csv``, ``comparison.md``, ``frontier.png`` and ``curves.png`` into
``OUT`` and prints the configuration table's size and any notes (missing files; a figure
with nothing to draw is not written, and the note says why, e.g. runs never evaluated).
With ``--at-kl`` also ``matched_kl.csv`` and ``matched_kl.md``: each objective's judge
scores at those KLs, with bootstrap intervals and differences from ``--baseline``
(`fpo.compare.matched`), and ``matched_kl_metrics.csv``: degeneration metrics and training
cost at those KLs (`fpo.compare.matched_metrics`). A folder with no runs is a user error (exit 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from fpo.commands.common import user_errors
from fpo.compare.report import compare


def _numbers(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpo-compare",
        description=(
            "Compare fpo-train runs: a table per run and per configuration (mean ± stderr "
            "over seeds), the judge-vs-KL frontier and the training curves; with --at-kl, "
            "each objective's judge scores at matched KL."
        ),
    )
    parser.add_argument(
        "dirs",
        nargs="+",
        metavar="DIR",
        help="run or multirun folders (logs/<task>/runs/<time>, logs/<task>/multiruns/<sweep>)",
    )
    parser.add_argument("--out", required=True, help="folder to write the comparison into")
    matched = parser.add_argument_group("scores at matched KL (matched_kl.csv, matched_kl.md)")
    matched.add_argument(
        "--at-kl",
        type=_numbers,
        default=[],
        metavar="KL[,KL...]",
        help="target KLs in nats, e.g. 3,6: each objective's score interpolated there, per seed",
    )
    matched.add_argument(
        "--baseline", default="fpo", help="objective the others are compared with (default fpo)"
    )
    matched.add_argument(
        "--judges", type=_names, default=None, help="judges to report, comma-separated (all)"
    )
    matched.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap replicates (default 2000; 0: none)"
    )
    matched.add_argument("--seed", type=int, default=0, help="the bootstrap's random seed")
    matched.add_argument(
        "--split",
        default=None,
        help="read evaluation/<SPLIT>/ (e.g. ood_test) instead of the main test set",
    )
    matched.add_argument(
        "--holm-family",
        type=int,
        default=None,
        metavar="M",
        help=(
            "Holm's family size per judge, when the comparison names more differences than "
            "have a value (e.g. 8: four baselines x two targets); the missing ones count as "
            "p = 1 (default: the differences in the table)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {
        "baseline": "fpo", "judges": None, "bootstrap": 2000, "seed": 0, "split": None,
        "holm_family": None,
    }  # fmt: skip
    given = [key for key, value in defaults.items() if getattr(args, key) != value]
    if given and not args.at_kl:
        flags = ", ".join("--" + key.replace("_", "-") for key in given)
        parser.error(f"{flags} only apply with --at-kl (e.g. --at-kl 3,6)")
    options = {key: getattr(args, key) for key in defaults} if args.at_kl else {}
    with user_errors():
        result = compare(args.dirs, args.out, args.at_kl, **options)
    for note in result["notes"]:
        print(f"note: {note}")
    print(
        f"compared {result['runs']} runs in {result['configurations']} configurations; "
        f"wrote {', '.join(str(p) for p in result['files'].values())}"
    )


if __name__ == "__main__":
    main()
