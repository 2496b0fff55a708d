"""A run killed with SIGKILL mid-epoch and restarted with ``ckpt_path=last`` ends exactly where
an uninterrupted run ends; the same config and seed give the same loss curve twice."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fpo.testing import run_module

# Eight fixture pairs, batch 2: four optimizer steps per epoch, two epochs. last.ckpt every
# three steps: step 3 (epoch 0, batch 3 of 4) and step 6 (epoch 1, batch 2 of 4).
SMOKE = (
    "experiment=smoke",
    "objective=fpo",
    "callbacks.last_checkpoint.every_n_train_steps=3",
)
KILL_AT = 7  # killed after step 7, before its checkpoint: resumes from step 6, mid-epoch 1
VOLATILE = ("run/", "per_sec", "time")  # wall-clock metrics


def train(log_dir: Path, *overrides: str):
    return run_module("fpo.commands.train", f"paths.log_dir={log_dir}", *SMOKE, *overrides)


def only_run(log_dir: Path) -> Path:
    runs = sorted((log_dir / "smoke" / "runs").iterdir())
    return runs[-1]


def stable_metrics(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not any(s in k for s in VOLATILE)}


def loss_curve(run: Path) -> list[tuple[int, float]]:
    with open(next(run.glob("csv/*/metrics.csv"))) as f:
        return [
            (int(r["step"]), float(r["train/loss"]))
            for r in csv.DictReader(f)
            if r.get("train/loss")
        ]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    log_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train(log_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run(log_dir)


def test_sigkilled_run_resumes_to_the_uninterrupted_result(uninterrupted, tmp_path):
    killed = train(
        tmp_path,
        "+callbacks.kill._target_=fpo.testing.faults.SigkillAfterStep",
        f"+callbacks.kill.step={KILL_AT}",
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    killed_run = only_run(tmp_path)
    last = load(killed_run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 1, "batches": 2}
    ]
    assert {"optimizer_states", "lr_schedulers", "fpo"} <= last.keys()
    assert not list((killed_run / "checkpoints").glob(".*tmp*")), "a temp file was left"
    clock = last["callbacks"]["FitClock"]  # the killed attempt's cost, up to step 6
    assert clock["attempts"] == 1 and clock["cpu_seconds"] > 0

    resumed = train(tmp_path, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "You're resuming from a checkpoint that ended before the epoch ended" not in resumed.stderr
    )
    resumed_run = only_run(tmp_path)
    assert resumed_run != killed_run

    assert stable_metrics(resumed_run) == stable_metrics(uninterrupted)
    cost = json.loads((resumed_run / "metrics.json").read_text())
    assert cost["run/fit_attempts"] == 2  # the resumed run counts the killed attempt's time
    assert cost["run/fit_cpu_seconds"] > clock["cpu_seconds"]
    assert cost["run/fit_seconds"] > clock["seconds"]
    assert cost["run/fit_load_average"] > 0 and cost["run/cpu_count"] >= 1
    ours, theirs = (
        load(resumed_run / "checkpoints/last.ckpt"),
        load(uninterrupted / "checkpoints/last.ckpt"),
    )
    assert ours["global_step"] == theirs["global_step"] == 8
    assert ours["state_dict"].keys() == theirs["state_dict"].keys()
    for key, value in theirs["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), key
    for a, b in zip(
        ours["optimizer_states"][0]["state"].values(),
        theirs["optimizer_states"][0]["state"].values(),
        strict=True,
    ):
        assert all(torch.equal(a[k], b[k]) for k in b), "optimizer moments differ"
    # the loss curve after the resume point is the uninterrupted one
    assert loss_curve(resumed_run) == [p for p in loss_curve(uninterrupted) if p[0] >= 6]


def test_a_run_stopped_by_max_steps_mid_epoch_extends_to_the_uninterrupted_result(
    uninterrupted, tmp_path
):
    """``trainer.max_steps`` ends training after step 2 of epoch 0's 4; Lightning counts that
    epoch as done, and a resume from the train-end last.ckpt started epoch 1 (was: the rest
    of epoch 0 and half of epoch 1 never trained). `LastCheckpoint` records it unfinished.
    (No validation runs at step 2, so the short run has no ``optimized_metric`` to return.)"""
    short = train(tmp_path, "++trainer.max_steps=2", "optimized_metric=null")
    assert short.returncode == 0, short.stderr[-3000:]
    last = load(only_run(tmp_path) / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and last["epoch"] == 0
    assert last["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches": 2}
    ]
    assert last["loops"]["fit_loop"]["epoch_progress"]["total"]["completed"] == 0

    extended = train(tmp_path, "++trainer.max_steps=-1", "optimized_metric=null", "ckpt_path=last")
    assert extended.returncode == 0, extended.stderr[-3000:]
    run = only_run(tmp_path)
    assert loss_curve(run) == [p for p in loss_curve(uninterrupted) if p[0] >= 2]
    assert stable_metrics(run) == stable_metrics(uninterrupted)
    ours = load(run / "checkpoints/last.ckpt")["state_dict"]
    theirs = load(uninterrupted / "checkpoints/last.ckpt")["state_dict"]
    assert all(torch.equal(ours[key], value) for key, value in theirs.items())


def test_same_config_and_seed_give_the_same_loss_curve(uninterrupted, tmp_path):
    again = train(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    curve = loss_curve(only_run(tmp_path))
    assert len(curve) == 8
    assert curve == loss_curve(uninterrupted)
    assert stable_metrics(only_run(tmp_path)) == stable_metrics(uninterrupted)


def test_ckpt_path_last_without_a_matching_run_is_refused(uninterrupted, tmp_path):
    fresh = train(tmp_path, "ckpt_path=last")
    assert fresh.returncode == 2
    assert "ckpt_path=last: no last.ckpt of an earlier run with this config" in fresh.stderr
    assert "Traceback" not in fresh.stderr
    # another config next to the uninterrupted run: refused, naming what differs
    other = train(uninterrupted.parents[2], "ckpt_path=last", "objective.beta=0.3")
    assert other.returncode == 2
    assert "differs in objective.beta" in other.stderr, other.stderr[-2000:]
