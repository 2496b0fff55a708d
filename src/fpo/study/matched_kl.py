"""Protocol 2 of ``docs/results.md`` end to end and resumable: every objective calibrated to
the same validation KLs, then seeds at the calibrated points, compared at matched KL.

    fpo-study --protocol matched_kl                  # every stage, in order
    fpo-study --protocol matched_kl --stage seeds    # one stage
    fpo-study --protocol matched_kl --dry-run        # print the commands only

Stages (each runs again safely: finished runs are read, interrupted ones resume):

0. ``restore``: on a machine whose ``logs/`` lack them, the calibration reports and the
   finished seed runs rebuilt from the committed export (`fpo.study.restore`).
1. ``cache``: the offline reference caches of DPO and FPO (``experiment=matched_kl/<obj>``).
2. ``calibrate``: ``fpo-calibrate`` per objective to :data:`TARGET_KLS` in its search range
   (:data:`RANGES`, validation prompts only). A target every run of the range misses, or
   one with no run at all on one side of it (no seed could straddle it), is tried once more
   with the range widened 10x on the side the report names.
3. ``seeds``: per seed of :data:`SEEDS`, then per calibrated objective, one ``fpo-train -m``
   sweep over both bracketing knob values of every target: seed by seed, so that a study
   stopped part-way has every objective at the same seeds; an objective whose calibration
   has not finished is skipped with a note.
4. ``compare``: ``fpo-compare --at-kl`` over the seed sweeps, FPO the baseline, Holm over
   :data:`HOLM_FAMILY` differences per judge, on the test prompts and on the second test set
   (``docs/results/matched_kl/{test,ood_test}/``).
5. ``export``: each objective's ``calibration.{json,md}`` (and ``compute.json``, the cost of
   its calibration runs), every seed run's generations of both test sets (all samples, every
   field), ``runs.csv`` (the committed rows of runs not on this machine or restored kept as
   they are) and ``compute.md`` (the study's
   total compute so far, per objective and stage, and the seed runs finished per seed) into
   ``docs/results/matched_kl/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from fpo.calibration.runs import format_knob, series_folder
from fpo.compare import load_runs, run_rows, write_csv
from fpo.machine_load import SHARED_LOAD_FACTOR, ran_alone
from fpo.study import restore
from fpo.study.comparison import BIN, OBJECTIVES, RESULTS, RUN_COLUMNS
from fpo.sweep import derive_sweep_name

OUT = RESULTS / "matched_kl"
TASK = "matched_kl"  # task_name of experiment=matched_kl/*
TARGET_KLS = (3.0, 6.0)
# the protocol's primary p-values, per judge: FPO against each baseline at each target, those
# without a value (a target out of an objective's reach) counted in Holm's family as p = 1
HOLM_FAMILY = (len(OBJECTIVES) - 1) * len(TARGET_KLS)
SEEDS = (1, 2, 3, 4, 5)
CALIBRATION_SEED = 0
# The protocol's search range of each objective's knob (the knob itself:
# configs/calibration_knobs.yaml), fixed before any protocol-2 run.
RANGES = {
    "fpo": (1e-6, 1e-3),
    "dpo": (0.1, 10.0),
    "tdpo2": (0.003, 3.0),
    "tdpo1": (0.3, 30.0),
    "simpo": (1e-7, 1e-5),
}
ORDER = ("fpo", "dpo", "tdpo2", "tdpo1", "simpo")  # the method of interest first
CACHED = ("fpo", "dpo")
TEST_SETS = restore.TEST_SETS  # export folder -> fpo-compare --split
WIDEN = 10.0
assert set(ORDER) == set(OBJECTIVES) == set(RANGES)


def experiment(objective: str) -> list[str]:
    return [f"experiment=matched_kl/{objective}"]


def log_dir() -> Path:
    """``paths.log_dir`` of the shipped configs: ``logs/`` under ``FPO_ROOT`` or the current
    folder (where ``fpo-study`` runs its commands)."""
    return (Path(os.environ.get("FPO_ROOT", ".")) / "logs").resolve()


def series_dir(objective: str) -> Path:
    """The objective's calibration series folder, as ``fpo-calibrate`` derives it from the
    same overrides: ``<paths.log_dir>/matched_kl/calibration/<objective>/<series>``."""
    overrides = [*experiment(objective), f"seed={CALIBRATION_SEED}"]
    return series_folder(log_dir(), TASK, objective, overrides)


def calibration_file(objective: str) -> Path:
    return series_dir(objective) / "calibration.json"


def read_calibration(objective: str) -> dict | None:
    path = calibration_file(objective)
    return json.loads(path.read_text()) if path.is_file() else None


def calibrate_command(objective: str, low: float, high: float) -> list[str]:
    kls = ",".join(f"{kl:g}" for kl in TARGET_KLS)
    return [
        str(BIN / "fpo-calibrate"), *experiment(objective), "--target-kl", kls,
        "--low", repr(low), "--high", repr(high), "--seed", str(CALIBRATION_SEED),
        "--study-seeds", ",".join(map(str, SEEDS)),
    ]  # fmt: skip


def widened(report: dict, low: float, high: float) -> tuple[float, float] | None:
    """The range widened once by :data:`WIDEN` on every side a target's finding names
    (``raise --high`` / ``lower --low``): an unreachable target, or a reached one with no run
    on one side of it (`fpo.calibration.report.side_gap`); ``None`` when none does."""
    findings = " ".join(t.get("finding") or "" for t in report["targets"])
    wider = (
        low / WIDEN if "lower --low" in findings else low,
        high * WIDEN if "raise --high" in findings else high,
    )
    return None if wider == (low, high) else wider


def seed_overrides(objective: str, report: dict, seed: int) -> list[str] | None:
    """The task overrides of ``seed``'s sweep over the seed knob values (``None``: no target
    has two bracketing values)."""
    values = report.get("seed_knobs") or []
    if not values:
        return None
    knobs = ",".join(format_knob(v) for v in values)
    return [*experiment(objective), f"{report['knob']}={knobs}", f"seed={seed}"]


def seed_sweeps(objective: str) -> list[Path]:
    """The seed sweeps' folders, one per seed of :data:`SEEDS`, run or not (``fpo-train -m``
    derives each from the same overrides); none before the objective is calibrated."""
    report = read_calibration(objective)
    found = [report and seed_overrides(objective, report, seed) for seed in SEEDS]
    # <paths.log_dir>/matched_kl/multiruns/<name>: fpo-train -m's folder for these overrides
    multiruns = series_dir(objective).parents[2] / "multiruns"
    return [multiruns / derive_sweep_name(overrides) for overrides in found if overrides]


def started_seed_sweeps() -> list[Path]:
    """Every objective's seed sweeps that hold a run (a job folder with its config): a sweep
    stopped before its first job wrote one holds nothing to compare or export yet."""
    sweeps = [folder for objective in ORDER for folder in seed_sweeps(objective)]
    return [folder for folder in sweeps if any(folder.glob("*/.hydra/config.yaml"))]


def run(command: list[str], dry_run: bool) -> int:
    print("$", " ".join(command), flush=True)
    return 0 if dry_run else subprocess.run(command).returncode


def stage_restore(dry_run: bool) -> None:
    """What this machine's ``logs/`` lack of the committed export (`fpo.study.restore`)."""
    if dry_run:
        return
    exported = {o: (OUT / "calibration" / o, series_dir(o)) for o in ORDER}
    reports = restore.restore_calibrations(exported)
    sweeps = {  # the seed sweeps of the calibrations now on this machine
        folder.name: (folder, experiment(objective))
        for objective in ORDER
        for folder in seed_sweeps(objective)
    }
    runs = restore.restore_seed_runs(sweeps, OUT)
    if reports or runs:
        print(f"restore: {reports} calibration reports and {runs} seed runs from {OUT}")


def stage_cache(dry_run: bool) -> None:
    for objective in CACHED:
        run([str(BIN / "fpo-cache"), *experiment(objective)], dry_run)


def stage_calibrate(dry_run: bool) -> None:
    for objective in ORDER:
        if calibration_file(objective).is_file() and not calibration_points(objective, here=True):
            print(f"calibrate: {objective}: restored from {OUT}, its runs not on this machine")
            continue  # fpo-calibrate would run its search again
        low, high = RANGES[objective]
        code = run(calibrate_command(objective, low, high), dry_run)
        report = None if dry_run else read_calibration(objective)
        wider = report and widened(report, *RANGES[objective])
        if code == 0 and wider:
            why = "a target is out of reach or has no run on one side"
            print(f"calibrate: {objective}: {why}; widening once to {wider}")
            run(calibrate_command(objective, *wider), dry_run)


def stage_seeds(dry_run: bool) -> None:
    for seed in SEEDS:
        for objective in ORDER:
            report = read_calibration(objective)
            overrides = report and seed_overrides(objective, report, seed)
            if not overrides:
                print(f"seeds: {objective}: no calibration with bracketing values yet; skipped")
                continue
            run([str(BIN / "fpo-train"), "-m", *overrides], dry_run)


def stage_compare(dry_run: bool) -> None:
    sweeps = started_seed_sweeps()
    if not sweeps:
        print("compare: no seed sweep has run yet")
        return
    kls = ",".join(f"{kl:g}" for kl in TARGET_KLS)
    for folder, split in TEST_SETS.items():
        command = [str(BIN / "fpo-compare"), *map(str, sweeps), "--out", str(OUT / folder)]
        command += ["--at-kl", kls, "--baseline", "fpo", "--holm-family", str(HOLM_FAMILY)]
        command += ["--split", split] if split else []
        run(command, dry_run)


def export_generations(source: Path, target: Path) -> None:
    """Every row of a run's ``generations.jsonl`` (every sample, its KL, every judge's
    score), as written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


def compute_rows() -> list[dict]:
    """Per objective and stage (calibration, seeds): finished runs (a ``metrics.json``), the
    sums of their training CPU time (``run/fit_cpu_seconds``, process CPU, every attempt) and
    wall time (``run/wall_seconds``: training and evaluation, pauses included), in hours, and
    how many runs were resumed, trained beside other jobs (`fpo.machine_load.ran_alone`) or
    predate those records (timed over their last attempt only)."""
    rows = []
    for objective in ORDER:
        stages = {"calibration": [series_dir(objective)], "seeds": seed_sweeps(objective)}
        for stage, folders in stages.items():
            found = [p for f in folders if f.is_dir() for p in f.rglob("metrics.json")]
            metrics = [json.loads(path.read_text()) for path in found]
            alone = [ran_alone(m) for m in metrics]
            committed = OUT / "calibration" / objective / "compute.json"
            if stage == "calibration" and not metrics and committed.is_file():
                # its runs finished on an earlier machine: the row exported there
                rows.append({**json.loads(committed.read_text()), "committed": True})
                continue
            rows.append(
                {
                    "objective": objective,
                    "stage": stage,
                    "runs": len(metrics),
                    "fit_cpu_hours": sum(m.get("run/fit_cpu_seconds", 0) for m in metrics) / 3600,
                    "wall_hours": sum(m.get("run/wall_seconds", 0) for m in metrics) / 3600,
                    "resumed": sum(m.get("run/fit_attempts", 1) > 1 for m in metrics),
                    "shared": alone.count(False),
                    "unrecorded": alone.count(None),
                }
            )
    return rows


def calibration_points(objective: str, here: bool = False) -> list[tuple[str, str, float]]:
    """The objective's finished calibration runs: (objective, ``knob=value``, validation
    KL), in the order they finished, read before its ``calibration.json`` exists. Where they
    finished on another machine (unless ``here``): its report's points, by knob value."""
    folder = series_dir(objective)
    found = list(folder.glob("*/run/metrics.json")) if folder.is_dir() else []
    if not found and not here:
        report = read_calibration(objective) or {}
        knob = report.get("knob")
        return [(objective, f"{knob}={format_knob(p['knob'])}", p.get("val_kl"))
                for p in report.get("points") or []]  # fmt: skip
    found.sort(key=lambda path: path.stat().st_mtime)
    return [
        (objective, path.parent.parent.name, json.loads(path.read_text()).get("val/sampled/kl"))
        for path in found
    ]


def seed_progress() -> list[str]:
    """A markdown table: per seed, each objective's finished seed runs of its knob values
    (``-``: not calibrated yet)."""
    counts = {}
    for objective in ORDER:
        report = read_calibration(objective) or {}
        knobs = len(report.get("seed_knobs") or [])
        for seed, folder in zip(SEEDS, seed_sweeps(objective), strict=False):
            done = len(list(folder.glob("*/metrics.json"))) if folder.is_dir() else 0
            counts[seed, objective] = f"{done}/{knobs}"
    return [
        "| seed | " + " | ".join(ORDER) + " |",
        "|---|" + "---|" * len(ORDER),
        *(
            f"| {seed} | " + " | ".join(counts.get((seed, o), "-") for o in ORDER) + " |"
            for seed in SEEDS
        ),
    ]


COMPUTE_COLUMNS = ("runs", "fit_cpu_hours", "wall_hours", "resumed", "shared", "unrecorded")


def write_compute(rows: list[dict], path: Path) -> None:
    total = {key: sum(row[key] for row in rows) for key in COMPUTE_COLUMNS}

    def cells(row: dict) -> str:
        return (
            f"{row['runs']} | {row['fit_cpu_hours']:.2f} | {row['wall_hours']:.2f} | "
            f"{row['resumed']} | {row['shared']} | {row['unrecorded']} |"
        )

    lines = [
        "# Protocol 2: compute so far",
        "",
        "Finished runs per objective and stage; training CPU time is the process's CPU time "
        "(both cores count) summed over every attempt of a resumed run, wall time covers the "
        "last attempt's training and evaluation and includes any pause. `resumed`: runs "
        "trained over more than one attempt; `shared`: runs whose training shared the machine "
        f"with other jobs (mean load average above {SHARED_LOAD_FACTOR:g} x the CPU count), so "
        "their times are inflated; `unrecorded`: runs from before these were recorded, timed "
        "over their last attempt only (`fpo-study --protocol matched_kl --stage export` "
        "rewrites this file).",
        "",
        "| objective | stage | runs | training CPU (h) | wall (h) | resumed | shared | "
        "unrecorded |",
        "|---|---|---|---|---|---|---|---|",
        *(f"| {r['objective']} | {r['stage']} | {cells(r)}" for r in rows),
        f"| **all** | | {cells(total)}",
        "",
        "## Seed runs finished so far",
        "",
        "Finished runs of each seed at the objective's seed knob values (run seed by seed).",
        "",
        *seed_progress(),
        "",
        "## Calibration runs finished so far",
        "",
        "Validation KL (nats per completion, the policy's samples on the validation prompts) "
        "of each finished calibration run, in the order they finished (by knob value where "
        "they finished on an earlier machine); each objective's "
        "`calibration/<objective>/calibration.md` replaces this once its search is done.",
        "",
        "| objective | knob | validation KL |",
        "|---|---|---|",
        *(
            f"| {objective} | `{knob}` | {'' if kl is None else f'{kl:.3g}'} |"
            for name in ORDER
            for objective, knob, kl in calibration_points(name)
        ),
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def stage_export() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for objective in ORDER:
        path = calibration_file(objective)
        if path.is_file():
            target = OUT / "calibration" / objective
            target.mkdir(parents=True, exist_ok=True)
            # run folders relative to the folder that holds logs/, not this machine's paths
            root = f"{log_dir().parent}/".replace("\\", "/")
            for name in ("calibration.json", "calibration.md"):
                text = (path.parent / name).read_text(encoding="utf-8")
                (target / name).write_text(text.replace(root, ""), encoding="utf-8")
    # the committed rows stay: runs finished on an earlier machine, or restored from them
    rows = restore.read_rows(OUT / "runs.csv")
    for run_ in load_runs(started_seed_sweeps()):
        name = f"{run_.path.parent.name}__{run_.path.name}"  # <sweep>__<job>
        if restore.RESTORED in run_.metrics:
            continue
        for folder, split in TEST_SETS.items():
            source = run_.path / "evaluation" / (split or "") / "generations.jsonl"
            if source.is_file():
                export_generations(source, OUT / "generations" / folder / f"{name}.jsonl")
        if (run_.path / "evaluation" / "summary.json").is_file():
            (row,) = run_rows([run_])
            cpus = run_.metrics.get(restore.CPU_COUNT[1])
            rows[name] = {**row, "run": name, restore.CPU_COUNT[0]: cpus}
    # which runs' times count (`fpo.machine_load.ran_alone`)
    columns = [*RUN_COLUMNS, "fit_attempts", "fit_load_average", restore.CPU_COUNT[0]]
    write_csv([rows[name] for name in sorted(rows)], OUT / "runs.csv", columns)
    compute = compute_rows()
    for row in compute:
        if row["stage"] == "calibration" and row["runs"] and not row.get("committed"):
            path = OUT / "calibration" / row["objective"] / "compute.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    write_compute(compute, OUT / "compute.md")
    print(f"export: {len(rows)} seed runs' generations, runs.csv and compute.md in {OUT}")


STAGES = ("restore", "cache", "calibrate", "seeds", "compare", "export")


def main(stage: str, dry_run: bool) -> None:
    """Run ``stage`` (or ``all``) of protocol 2."""
    stages = {
        "restore": stage_restore,
        "cache": stage_cache,
        "calibrate": stage_calibrate,
        "seeds": stage_seeds,
        "compare": stage_compare,
        "export": lambda dry_run: None if dry_run else stage_export(),
    }
    for name in stages if stage == "all" else (stage,):
        stages[name](dry_run)
