"""``calibration.json`` and ``calibration.md``: every run tried, the value chosen per target,
the two values that bracket it (the seed runs' knob values, see
`fpo.calibration.search.TargetCalibration`) or the finding that the target is out of reach,
and the seed sweep's command."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fpo.calibration.knobs import VAL_KL, VAL_SCORE, Plan
from fpo.calibration.runs import Point, format_knob
from fpo.calibration.search import Calibration, Status, TargetCalibration, Tolerance


def seed_knobs(results: Sequence[TargetCalibration]) -> list[float]:
    """The distinct knob values the seeds run at: both bracketing values of every target
    that has both (a one-sided target gets no seed runs: its seeds could not interpolate)."""
    values = {k for result in results for k in (result.seed_knobs or ())}
    return sorted(values)


def seed_command(
    plan: Plan, results: Sequence[TargetCalibration], seeds: Sequence[int]
) -> str | None:
    """``fpo-train -m`` over the seeds at every bracketing knob value (``None``: none)."""
    values = seed_knobs(results)
    if not values:
        return None
    kept = [o for o in plan.overrides if o.split("=", 1)[0] != "seed"]
    return " ".join(
        [
            "fpo-train -m",
            *kept,
            f"{plan.knob.key}={','.join(format_knob(v) for v in values)}",
            f"seed={','.join(str(s) for s in seeds)}",
        ]
    )


def _status(search: Calibration | None) -> str | None:
    return None if search is None else search.status.value


def target_entry(
    result: TargetCalibration, points: dict[float, Point], hint: str, gap: str = ""
) -> dict[str, Any]:
    def point(knob: float | None) -> dict | None:
        return points[knob].as_dict() if knob is not None else None

    on_target = result.on_target
    finding = on_target.finding
    if on_target.status == "unreachable" and hint:
        finding += f" ({hint})"
    if gap:
        finding += f"; {gap}"
    return {
        "target_kl": on_target.target,
        "allowed": on_target.allowed,
        "status": on_target.status.value,
        "finding": finding,
        "chosen": point(on_target.chosen),
        "closest": point(on_target.closest),
        "below": point(result.below),
        "above": point(result.above),
        "side_searches": {"lower": _status(result.lower), "upper": _status(result.upper)},
        "seed_knobs": list(result.seed_knobs) if result.seed_knobs else None,
    }


def widen_hint(plan: Plan, result: Calibration) -> str:
    """Which end of the range to move for an unreachable target (when the direction is
    stated)."""
    if plan.knob.increases_kl is None or not result.points:
        return ""
    over = min(result.points.values()) >= result.target  # every KL too high
    raise_knob = over != plan.knob.increases_kl
    return f"{'raise --high' if raise_knob else 'lower --low'} to reach it"


def side_gap(plan: Plan, result: TargetCalibration) -> str:
    """For a target with no run at all on one side of it (so no seed's two runs can straddle
    it, e.g. a KL that levels off just above the target): which side, and which end of the
    range to move (``""`` when both sides have a run or the target is unreachable)."""
    if result.on_target.status is Status.unreachable:
        return ""
    on_target, gaps = result.on_target, []
    sides = (("under", result.below, result.lower), ("over", result.above, result.upper))
    for word, knob, search in sides:
        if knob is None and search is not None and search.status is Status.unreachable:
            hint = widen_hint(plan, search)
            gaps.append(
                f"no run {word} {on_target.target:g} in [{on_target.low:g}, {on_target.high:g}]"
                + (f" ({hint})" if hint else "")
            )
    return "; ".join(gaps)


def build_report(
    plan: Plan,
    results: Sequence[Calibration],
    points: dict[float, Point],
    *,
    tolerance: Tolerance,
    max_runs: int,
    seeds: Sequence[int],
    command: str,
) -> dict[str, Any]:
    return {
        "command": command,
        "objective": plan.objective,
        "knob": plan.knob.key,
        "direction": plan.knob.direction,
        "range": [plan.low, plan.high],
        "overrides": plan.overrides,
        "measured": {"kl": VAL_KL, "score": VAL_SCORE},
        "tolerance": {"relative": tolerance.relative, "absolute": tolerance.absolute},
        "max_runs_per_target": max_runs,
        "points": [points[k].as_dict() for k in sorted(points)],
        "targets": [
            target_entry(r, points, widen_hint(plan, r.on_target), side_gap(plan, r))
            for r in results
        ],
        "seed_knobs": seed_knobs(results),
        "seed_command": seed_command(plan, results, seeds),
    }


def _cell(point: dict | None) -> str:
    return "-" if point is None else f"{point['knob']:g} / {point['val_kl']:.3g}"


def markdown(report: dict[str, Any]) -> str:
    tol = report["tolerance"]
    lines = [
        f"# Calibration of {report['objective']}: {report['knob']} ({report['direction']})",
        "",
        f"`{report['command']}`",
        "",
        f"Validation KL (`{report['measured']['kl']}`) on target within max({tol['absolute']}, "
        f"{tol['relative']:g} x target) nats; range [{report['range'][0]:g}, "
        f"{report['range'][1]:g}]; at most {report['max_runs_per_target']} new runs per target in "
        f"each invocation; {len(report['points'])} runs in all (below).",
        "Seed runs at `below` and `above` (knob / val KL): a KL one to three tolerances under",
        "and over the target when the side searches found one, else the closest run.",
        "",
        "| target KL | status | chosen (knob / val KL) | below | above | finding |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["targets"]:
        lines.append(
            f"| {t['target_kl']:g} | {t['status']} | {_cell(t['chosen'])} | {_cell(t['below'])} "
            f"| {_cell(t['above'])} | {t['finding']} |"
        )
    lines += ["", "Every run (validation only):", "", "| knob | val KL | val score | run |"]
    lines.append("|---|---|---|---|")
    for p in report["points"]:
        score = "-" if p["val_score"] is None else f"{p['val_score']:.3f}"
        lines.append(f"| {p['knob']:g} | {p['val_kl']:.3f} | {score} | `{p['run_dir']}` |")
    lines.append("")
    if report["seed_command"]:
        lines += ["Seed runs at both bracketing values of every target:", ""]
        lines += [f"    {report['seed_command']}", ""]
    else:
        lines += ["No target is bracketed yet: no seed runs to start.", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """``calibration.json`` and ``calibration.md`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "calibration.json", folder / "calibration.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path
