"""Sweeps as a user runs them: a failing job, a killed sweep run again, an Optuna search."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fpo.sweep import derive_sweep_name
from fpo.testing import ROOT, command_env, run_module


def train_args(tmp_path: Path, *overrides: str) -> list[str]:
    """``fpo-train -m OVERRIDES`` with its logs under ``tmp_path``, as ``python -m`` args."""
    return ["fpo.commands.train", "-m", f"paths.log_dir={tmp_path}", *overrides]


def only_sweep_dir(tmp_path: Path, task: str = "smoke") -> Path:
    sweeps = [p for p in (tmp_path / task / "multiruns").iterdir() if p.is_dir()]
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def statuses(sweep_dir: Path) -> dict[str, dict]:
    files = sorted(sweep_dir.glob("*/job_status.json"))
    return {p.parent.name: json.loads(p.read_text()) for p in files}


def summary(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / "sweep_summary.json").read_text())


def test_sweep_name_is_the_command_minus_where_it_runs():
    base = ["experiment=smoke", "objective=dpo,fpo", "seed=0,1"]
    name = derive_sweep_name(base)
    assert name == derive_sweep_name([*base, "paths.log_dir=/elsewhere", "sweep.resume=false"])
    assert name.startswith("experiment=smoke_objective=dpo,fpo_seed=0,1-")
    assert name != derive_sweep_name(["experiment=smoke", "objective=dpo,fpo", "seed=0,2"])
    # Order sets the job numbers, hence the job folders: another order is another sweep.
    assert name != derive_sweep_name(["experiment=smoke", "seed=0,1", "objective=dpo,fpo"])
    assert "/" not in derive_sweep_name(["data.train_source=/a/b.jsonl"])


def test_failing_job_is_recorded_and_the_others_finish(tmp_path):
    """FPO's k exceeds the random SAE's width (a config error); DPO and SimPO (no feature
    term) still run and finish; the sweep exits 1 after all jobs. Jobs run in two parallel
    worker processes (hydra/launcher=parallel): they find the sweep's folder too."""
    result = run_module(
        *train_args(
            tmp_path,
            "experiment=smoke",
            "objective=dpo,fpo,simpo",
            "objective.constraints.features.k=500",
            "hydra/launcher=parallel",
        )
    )
    assert result.returncode == 1, result.stderr[-3000:]
    sweep_dir = only_sweep_dir(tmp_path)
    jobs = {job["dir"].split("objective=")[-1]: job for job in summary(sweep_dir)["jobs"]}
    assert {name: job["status"] for name, job in jobs.items()} == {
        "dpo": "finished",
        "fpo": "failed",
        "simpo": "finished",
    }
    assert "features.k=500" in jobs["fpo"]["error"], jobs["fpo"]
    assert 0.0 <= jobs["simpo"]["value"] <= 1.0
    assert jobs["simpo"]["metrics"]["train/loss"] > 0
    assert "1 of 3 sweep jobs did not finish" in result.stderr
    markdown = (sweep_dir / "sweep_summary.md").read_text()
    assert "2 finished, 1 failed" in markdown and "features.k=500" in markdown


def test_non_finite_training_is_a_failed_job(tmp_path):
    result = run_module(
        *train_args(tmp_path, "experiment=smoke", "objective=simpo", "optimizer.lr=1e39")
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (job,) = summary(only_sweep_dir(tmp_path))["jobs"]
    assert job["status"] == "failed"
    assert "non-finite" in job["error"] or "nan" in job["error"].lower(), job["error"]


def test_killed_sweep_rerun_runs_only_the_missing_jobs(tmp_path):
    """Two objectives x two seeds; SIGKILL of the process group while the third job is
    half-way (its last.ckpt exists); the same command again skips the two finished jobs,
    resumes the third from its checkpoint, runs the fourth, and exits 0."""
    command = train_args(
        tmp_path,
        "experiment=smoke",
        "callbacks=default",
        "callbacks.last_checkpoint.every_n_train_steps=2",
        "objective=dpo,simpo",
        "seed=0,1",
        "trainer.max_epochs=10",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=ROOT,
        env=command_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        third_checkpoint = None
        while third_checkpoint is None:
            assert process.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline, "the third job never checkpointed"
            found = list((tmp_path / "smoke" / "multiruns").glob("*/2_*/checkpoints/last.ckpt"))
            third_checkpoint = found[0] if found else None
            time.sleep(0.02)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    sweep_dir = only_sweep_dir(tmp_path)
    before = statuses(sweep_dir)
    assert [s["status"] for s in before.values()] == ["finished", "finished", "running"], before

    result = run_module(*command)
    assert result.returncode == 0, result.stderr[-3000:]
    after = statuses(sweep_dir)
    assert len(after) == 4
    for name in list(before)[:2]:  # untouched: not run again
        assert after[name] == before[name], name
    third, fourth = (after[name] for name in sorted(after)[2:])
    assert third["attempts"] == 2
    assert third["resumed_from"] == str(third_checkpoint)
    assert fourth["attempts"] == 1 and fourth["resumed_from"] is None
    # The resumed job went on from its checkpoint: its second CSV log starts after step 0.
    logs = sorted((third_checkpoint.parents[1] / "csv").glob("version_*/metrics.csv"))
    assert len(logs) == 2, logs
    with logs[-1].open() as handle:
        steps = [int(row["step"]) for row in csv.DictReader(handle) if row.get("step")]
    assert min(steps) > 0, steps
    jobs = summary(sweep_dir)["jobs"]
    assert [j["status"] for j in jobs] == ["finished"] * 4
    assert [j["num"] for j in jobs] == [0, 1, 2, 3]
    assert all(0.0 <= j["value"] <= 1.0 for j in jobs)


@pytest.mark.parametrize("search", ["fpo_optuna"])
def test_optuna_search_writes_trials_and_resumes_its_study(tmp_path, search):
    optuna = pytest.importorskip("optuna")
    command = train_args(
        tmp_path, "experiment=smoke", f"hparams_search={search}", "hydra.sweeper.n_trials=3"
    )
    first = run_module(*command)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep_dir = only_sweep_dir(tmp_path)
    storage = f"sqlite:///{sweep_dir / 'optuna.sqlite'}"
    (study_summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=study_summary.study_name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    jobs = summary(sweep_dir)["jobs"]
    assert sorted(j["value"] for j in jobs) == sorted(t.value for t in study.trials)
    assert all(j["status"] == "finished" for j in jobs)

    second = run_module(*command)  # the same command: the same folder and study, three more trials
    assert second.returncode == 0, second.stderr[-3000:]
    study = optuna.load_study(study_name=study_summary.study_name, storage=storage)
    assert len(study.trials) == 6
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    assert (sweep_dir / "optimization_results.yaml").exists()


def test_finished_jobs_lose_last_checkpoint_only_when_asked(tmp_path):
    """``sweep.keep_last_checkpoint=false`` deletes a finished job's last.ckpt (the default
    keeps it); the job still finishes and records its metric."""
    for keep in ("true", "false"):
        logs = tmp_path / keep
        overrides = ["experiment=smoke", "objective=dpo", f"sweep.keep_last_checkpoint={keep}"]
        result = run_module(*train_args(logs, *overrides))
        assert result.returncode == 0, result.stderr[-3000:]
        sweep_dir = only_sweep_dir(logs)
        (job,) = summary(sweep_dir)["jobs"]
        assert job["status"] == "finished"
        (job_dir,) = [p.parent for p in sweep_dir.glob("*/job_status.json")]
        assert (job_dir / "checkpoints" / "last.ckpt").exists() == (keep == "true")
