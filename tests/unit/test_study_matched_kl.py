"""fpo-study --protocol matched_kl (fpo.study.matched_kl): protocol 2's stages derive their
commands from the calibration reports, widen an unreachable range once, and export every
sample of every seed run."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from fpo.study import matched_kl


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Logs under a temporary folder (paths.log_dir is ./logs), results under it too."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FPO_ROOT", raising=False)
    monkeypatch.setattr(matched_kl, "OUT", tmp_path / "results")
    return tmp_path


def write_report(objective: str, seed_knobs: list[float], targets: list[dict]) -> dict:
    path = matched_kl.calibration_file(objective)
    report = {
        "objective": objective,
        "knob": "objective.constraints.features.alpha",
        "seed_knobs": seed_knobs,
        "targets": targets,
        "runs": [{"run": str(path.parent.parent / "x" / "run")}],  # absolute, as written
    }
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(report))
    (path.parent / "calibration.md").write_text("# Calibration\n")
    return report


def test_calibration_runs_fpo_first_in_the_protocols_ranges(in_tmp, capsys):
    matched_kl.stage_calibrate(dry_run=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$")]
    assert [line.split()[2] for line in lines] == [
        f"experiment=matched_kl/{o}" for o in ("fpo", "dpo", "tdpo2", "tdpo1", "simpo")
    ]
    assert "--target-kl 3,6 --low 1e-06 --high 0.001 --seed 0" in lines[0]
    assert "--low 1e-07 --high 1e-05" in lines[-1]


def test_the_series_folder_is_the_one_fpo_calibrate_uses(in_tmp):
    from fpo.commands.calibrate_plan import make_plan

    for objective, (low, high) in matched_kl.RANGES.items():
        plan = make_plan(matched_kl.experiment(objective), seed=0, low=low, high=high)
        assert matched_kl.series_dir(objective) == plan.series_dir


def test_an_unreachable_target_widens_the_named_side_once():
    unreachable = {"status": "unreachable", "finding": "out of reach (raise --high to reach it)"}
    reached = {"status": "converged", "finding": None}
    assert matched_kl.widened({"targets": [reached, unreachable]}, 1e-6, 1e-3) == (1e-6, 1e-2)
    lower = {**unreachable, "finding": "out of reach (lower --low to reach it)"}
    assert matched_kl.widened({"targets": [lower]}, 0.1, 10.0) == (0.01, 10.0)
    assert matched_kl.widened({"targets": [reached]}, 0.1, 10.0) is None
    # reached, but no run under it: no seed could straddle it (TDPO-2's KL levels off at 3.1)
    one_sided = {
        "status": "converged",
        "finding": "KL 3.14 at 0.424 (within 0.3 of 3); no run under 3 in [0.003, 3] (raise "
        "--high to reach it)",
    }
    assert matched_kl.widened({"targets": [one_sided]}, 0.003, 3.0) == (0.003, 30.0)
    both = {"targets": [one_sided, lower]}  # each side a target names is widened
    assert matched_kl.widened(both, 0.003, 3.0) == pytest.approx((0.0003, 30.0))


def test_seeds_run_both_bracketing_values_of_every_target_and_skip_the_uncalibrated(in_tmp, capsys):
    write_report("fpo", [2e-05, 5e-05, 0.0001, 0.0003], [])
    write_report("dpo", [0.25, 0.5, 2.5, 4.5], [])
    matched_kl.stage_seeds(dry_run=True)
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$")]
    # seed by seed, each calibrated objective at its four knob values: a study stopped
    # part-way has every objective at the same seeds
    expected = [
        f"fpo-train -m experiment=matched_kl/{objective} "
        f"objective.constraints.features.alpha={knobs} seed={seed}"
        for seed in (1, 2, 3, 4, 5)
        for objective, knobs in (("fpo", "2e-05,5e-05,0.0001,0.0003"), ("dpo", "0.25,0.5,2.5,4.5"))
    ]
    assert len(commands) == len(expected)
    assert all(c.endswith(e) for c, e in zip(commands, expected, strict=True)), commands
    assert "seeds: tdpo2: no calibration with bracketing values yet; skipped" in out
    # the folders fpo-train -m gives these overrides are where compare and export look
    sweeps = matched_kl.seed_sweeps("fpo")
    assert len(set(sweeps)) == 5
    assert all(s.parent == in_tmp / "logs" / "matched_kl" / "multiruns" for s in sweeps)
    assert all(s.name.startswith("experiment=matched_kl_fpo_objective.constraints") for s in sweeps)
    assert matched_kl.seed_sweeps("tdpo2") == []


def test_export_keeps_every_sample_of_both_test_sets(in_tmp):
    write_report("fpo", [1e-4, 3e-4], [])
    sweep = matched_kl.seed_sweeps("fpo")[0]
    run = sweep / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\nobjective: {name: fpo}\n")
    (run / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    clock = {"run/fit_attempts": 2.0, "run/fit_load_average": 1.9}  # resumed once, alone
    (run / "metrics.json").write_text(json.dumps(clock))
    rows = [
        {"prompt_index": 0, "sample": s, "policy": "p", "reference": "r", "kl_log_ratio": 1.5}
        for s in (0, 1)
    ]
    for folder in ("evaluation", "evaluation/ood_test"):
        (run / folder).mkdir(parents=True, exist_ok=True)
        (run / folder / "summary.json").write_text(json.dumps({"kl": 1.5}))
        (run / folder / "generations.jsonl").write_text(
            "".join(json.dumps(row) + "\n" for row in rows)
        )
    matched_kl.stage_export()
    out = in_tmp / "results"
    for folder in ("test", "ood_test"):
        (exported,) = (out / "generations" / folder).iterdir()
        assert [json.loads(line) for line in exported.read_text().splitlines()] == rows
    exported = json.loads((out / "calibration" / "fpo" / "calibration.json").read_text())
    assert exported["runs"] == [{"run": "logs/matched_kl/calibration/fpo/x/run"}]  # not /tmp/...
    (row,) = csv.DictReader((out / "runs.csv").open())
    assert row["run"] == f"{sweep.name}__0" and row["objective"] == "fpo"
    assert row["fit_attempts"] == "2.0" and row["fit_load_average"] == "1.9"


def test_a_sweep_stopped_before_its_first_run_is_not_compared_or_exported(in_tmp, capsys):
    write_report("fpo", [1e-4, 3e-4], [])
    first, second = matched_kl.seed_sweeps("fpo")[:2]
    (first / "0" / ".hydra").mkdir(parents=True)
    (first / "0" / ".hydra" / "config.yaml").write_text("seed: 1\nobjective: {name: fpo}\n")
    (second / "0").mkdir(parents=True)  # stopped before the job wrote its config
    (second / "multirun.yaml").write_text("{}\n")
    assert matched_kl.started_seed_sweeps() == [first]
    matched_kl.stage_compare(dry_run=True)
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$")]
    assert commands and all(str(second) not in c and str(first) in c for c in commands)
    # Holm over the protocol's eight primary differences per judge (4 baselines x 2 targets)
    assert len(commands) == 2 and all("--holm-family 8" in c for c in commands)
    matched_kl.stage_export()  # before: "... holds no runs", a traceback
    assert (in_tmp / "results" / "runs.csv").is_file()


def test_export_states_the_compute_so_far(in_tmp):
    write_report("fpo", [1e-4, 3e-4], [])
    calibration = matched_kl.series_dir("fpo") / "alpha=1e-4" / "run"
    seed_runs = [matched_kl.seed_sweeps("fpo")[0] / "0", matched_kl.seed_sweeps("fpo")[4] / "1"]
    clocks = (  # an older run; a resumed run on a quiet machine; a run beside other jobs
        {},
        {"run/fit_attempts": 2.0, "run/fit_load_average": 2.1, "run/cpu_count": 2.0},
        {"run/fit_attempts": 1.0, "run/fit_load_average": 3.9, "run/cpu_count": 2.0},
    )
    folders = ((calibration, 1800.0), (seed_runs[0], 3600.0), (seed_runs[1], 5400.0))
    for (folder, cpu), clock in zip(folders, clocks, strict=True):
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "config.yaml").write_text("seed: 1\nobjective: {name: fpo}\n")
        metrics = {"run/fit_cpu_seconds": cpu, "run/wall_seconds": 2 * cpu, "val/sampled/kl": 4.25}
        (folder / "metrics.json").write_text(json.dumps(metrics | clock))
    rows = {(r["objective"], r["stage"]): r for r in matched_kl.compute_rows()}
    assert rows[("fpo", "calibration")]["runs"] == 1
    assert rows[("fpo", "calibration")]["fit_cpu_hours"] == pytest.approx(0.5)
    assert rows[("fpo", "seeds")]["runs"] == 2
    assert rows[("fpo", "seeds")]["wall_hours"] == pytest.approx(5.0)
    assert rows[("dpo", "seeds")]["runs"] == 0  # not calibrated yet
    matched_kl.stage_export()
    text = (in_tmp / "results" / "compute.md").read_text()
    assert "| fpo | calibration | 1 | 0.50 | 1.00 | 0 | 0 | 1 |" in text
    assert "| fpo | seeds | 2 | 2.50 | 5.00 | 1 | 1 | 0 |" in text
    assert "| **all** | | 3 | 3.00 | 6.00 | 1 | 1 | 1 |" in text
    assert "| fpo | `alpha=1e-4` | 4.25 |" in text  # the calibration run, not the seeds'
    assert "| 1 | 1/2 | - | - | - | - |" in text  # seed 1: one of FPO's two knob values
    assert "| 5 | 1/2 | - | - | - | - |" in text and "| 3 | 0/2 | - | - | - | - |" in text
    assert text.count("4.25") == 1


def test_fpo_study_refuses_a_stage_of_the_other_protocol():
    result = subprocess.run(
        [sys.executable, "-m", "fpo.study.comparison", "--protocol", "matched_kl", "--stage",
         "frontier", "--dry-run"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--protocol matched_kl has the stages restore, cache, calibrate" in result.stderr


def test_fpo_study_reports_a_user_error_as_one_paragraph(monkeypatch, capsys):
    from fpo.commands import common
    from fpo.errors import UserError
    from fpo.study import comparison

    def broken(stage, dry_run):
        raise UserError("logs/matched_kl/multiruns/x holds no runs")

    monkeypatch.setattr(common, "_task_started", False)  # restored after the test
    monkeypatch.setattr(matched_kl, "main", broken)
    monkeypatch.setattr(sys, "argv", ["fpo-study", "--protocol", "matched_kl", "--stage", "export"])
    with pytest.raises(SystemExit) as exit_:
        comparison.main()
    assert exit_.value.code == 2
    assert "error: logs/matched_kl/multiruns/x holds no runs" in capsys.readouterr().err
