"""``fpo-calibrate``: the knob value of an objective that puts its VALIDATION
KL(policy || reference) at each target KL, and two values that bracket it for the seed runs
of a matched-KL comparison.

    fpo-calibrate experiment=matched_kl/dpo --target-kl 3,6 --low 0.3 --high 30
    fpo-calibrate experiment=smoke objective=simpo evaluation=smoke \\
        evaluation.validation.prompts_file=tests/fixtures/plain_pairs.jsonl --target-kl 0.3

Every other argument is an ``fpo-train`` override. The knob is the objective's entry in
``configs/calibration_knobs.yaml`` unless ``--knob KEY``; each knob value is one resumable
``fpo-train`` job in ``logs/<task>/calibration/<objective>/<overrides>/<knob>=<value>/run``
(run the same command again after an interruption: finished runs are read, an interrupted
one resumes from its last.ckpt). Writes ``calibration.json`` and ``calibration.md`` beside
the runs and prints the table with the seed sweep's command. Test metrics are never read.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from fpo.calibration.report import build_report, markdown, write_report
from fpo.calibration.runs import Runner
from fpo.calibration.search import Tolerance, calibrate_target
from fpo.commands.calibrate_plan import make_plan
from fpo.commands.common import user_errors
from fpo.errors import UserError


def numbers(text: str, kind: type = float) -> list:
    """``"3,6"`` -> ``[3.0, 6.0]``."""
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fpo-calibrate",
        description=(
            "Find, per target KL, the knob value whose validation KL(policy || reference) "
            "lands on it and two values that bracket it for the seed runs (false position "
            "on log(knob) and log(KL); runs reused and resumable)."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="fpo-train overrides (experiment=...)")
    parser.add_argument("--target-kl", required=True, type=numbers, help="e.g. 3,6 (nats)")
    parser.add_argument("--knob", help="config key of the strength knob (default: the map's)")
    parser.add_argument("--low", type=float, help="lowest knob value searched")
    parser.add_argument("--high", type=float, help="highest knob value searched")
    parser.add_argument("--max-runs", type=int, default=8, help="new runs per target (8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration runs (0)")
    parser.add_argument("--rel-tol", type=float, default=Tolerance.relative)
    parser.add_argument("--abs-tol", type=float, default=Tolerance.absolute)
    parser.add_argument(
        "--study-seeds",
        type=lambda text: numbers(text, int),
        default=[1, 2, 3, 4, 5],
        help="seeds of the printed seed-sweep command (1,2,3,4,5)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_intermixed_args(argv)
    with user_errors():
        if any(o.startswith("-") for o in args.overrides):
            raise UserError(f"unknown option among {args.overrides}: see fpo-calibrate --help.")
        if not args.target_kl or min(args.target_kl) <= 0 or args.max_runs < 0:
            raise UserError("--target-kl needs positive KLs and --max-runs a count >= 0.")
        plan = make_plan(
            args.overrides, seed=args.seed, knob=args.knob, low=args.low, high=args.high
        )
        runner = Runner(plan.series_dir, plan.knob.key, plan.overrides)
        runner.finished()
        tolerance = Tolerance(args.rel_tol, args.abs_tol)
        results = []
        command = shlex.join(["fpo-calibrate", *(sys.argv[1:] if argv is None else argv)])
        try:
            for target in args.target_kl:
                known = {k: p.val_kl for k, p in runner.points.items()}
                result = calibrate_target(
                    runner.measure, target, plan.low, plan.high,
                    known=known, tolerance=tolerance, max_runs=args.max_runs,
                )  # fmt: skip
                results.append(result)
        finally:  # a failed run stops the search; what was measured is still reported
            report = build_report(
                plan, results, runner.points, tolerance=tolerance, max_runs=args.max_runs,
                seeds=args.study_seeds, command=command,
            )  # fmt: skip
            json_path, md_path = write_report(report, plan.series_dir)
            print(markdown(report))
            new = sum(len(result.new_runs) for result in results)
            print(f"this invocation started {new} new run{'s' * (new != 1)}")
            print(f"wrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
