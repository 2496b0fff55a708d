"""A run stopped by SIGTERM (pre-emption) or SIGINT (Ctrl-C) saves last.ckpt, prints the
resume command and exits 143 / 130; the printed command resumes it in its own folder (an
explicit ``hydra.run.dir`` outside ``paths.log_dir``, as on a cluster) to the uninterrupted
result. In a multirun the job is recorded as interrupted and the rerun resumes it."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from fpo.checkpoints import resolve_ckpt_path
from fpo.interrupts import resume_command
from fpo.testing import run_module, run_python

SMOKE = ("experiment=smoke", "objective=fpo", "callbacks.last_checkpoint.every_n_train_steps=3")
VOLATILE = ("run/", "per_sec", "time")


def stop_after(step: int, name: str) -> tuple[str, ...]:
    return (
        "+callbacks.stop._target_=fpo.testing.faults.SignalAfterStep",
        f"+callbacks.stop.step={step}",
        f"+callbacks.stop.name={name}",
    )


def stable_metrics(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not any(s in k for s in VOLATILE)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_module("fpo.commands.train", *SMOKE, f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


@pytest.mark.parametrize(("name", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_saves_prints_the_resume_command_and_exits_nonzero(
    uninterrupted, tmp_path, name, status
):
    run = tmp_path / "cluster" / "run"  # outside paths.log_dir: found as the run's own folder
    args = (*SMOKE, f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run}")
    stopped = run_module("fpo.commands.train", *args, *stop_after(5, name))
    assert stopped.returncode == status, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5  # the step in which the signal came, completed
    assert not (run / "metrics.json").exists()
    assert f"interrupted by {name}" in stopped.stderr
    command = stopped.stderr.split("Resume with:\n", 1)[1].splitlines()[0].strip()
    assert command.endswith(" ckpt_path=last")
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "fpo.commands.train"]

    resumed = run_python(*argv[1:])  # the printed command, as given
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    said = resumed.stdout + resumed.stderr
    assert f"ckpt_path=last: resuming from {run / 'checkpoints' / 'last.ckpt'}" in said
    assert stable_metrics(run) == stable_metrics(uninterrupted)


@pytest.mark.parametrize(("after", "saved"), [(4, 5), (8, 8)], ids=["mid-training", "last"])
def test_a_sigterm_during_validation_stops_after_the_next_step_or_when_training_ends(
    uninterrupted, tmp_path, after, saved
):
    """Validation runs after steps 4 and 8 (the epochs' ends). A SIGTERM during the first
    stops after step 5 (with its checkpoint); during the last, when training ends: the
    train-end last.ckpt with the final metrics, from which a resume only evaluates."""
    run = tmp_path / "run"
    args = (*SMOKE, f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run}")
    fault = (
        "+callbacks.stop._target_=fpo.testing.faults.SignalInValidation",
        f"+callbacks.stop.step={after}",
    )
    stopped = run_module("fpo.commands.train", *args, *fault)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "interrupted by SIGTERM" in stopped.stderr
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == saved
    assert ("fpo_final_metrics" in last) == (after == 8)
    assert not (run / "metrics.json").exists()

    resumed = run_module("fpo.commands.train", *args, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert stable_metrics(run) == stable_metrics(uninterrupted)


def test_an_interrupted_sweep_job_is_recorded_as_such_and_resumed(tmp_path):
    args = ("-m", *SMOKE, f"paths.log_dir={tmp_path}", "sweep.name=s", "objective.beta=0.1")
    stopped = run_module("fpo.commands.train", *args, *stop_after(5, "SIGTERM"))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Rerun the same multirun command" in stopped.stderr
    (job,) = (tmp_path / "smoke" / "multiruns" / "s").glob("0_*")
    assert json.loads((job / "job_status.json").read_text())["status"] == "interrupted"

    # the same command (the fault fires after step 5 only: the resumed job runs from 6)
    again = run_module("fpo.commands.train", *args, *stop_after(5, "SIGTERM"))
    assert again.returncode == 0, again.stderr[-3000:]
    status = json.loads((job / "job_status.json").read_text())
    assert status["status"] == "finished"
    assert status["resumed_from"] == str(job / "checkpoints" / "last.ckpt")


def test_ckpt_path_last_takes_the_run_folders_own_checkpoint_first(tmp_path):
    own = tmp_path / "cluster" / "run"
    (own / "checkpoints").mkdir(parents=True)
    (own / "checkpoints" / "last.ckpt").write_bytes(b"x")
    found = resolve_ckpt_path("last", {}, tmp_path / "logs" / "smoke", own_dir=own)
    assert found == str(own / "checkpoints" / "last.ckpt")


def test_the_resume_command_is_the_command_plus_ckpt_path_last():
    argv = ["/x/src/fpo/commands/train.py", "a=1", "ckpt_path=/old.ckpt", "b=two words"]
    assert resume_command(argv) == "python -m fpo.commands.train a=1 'b=two words' ckpt_path=last"
    assert resume_command(["/venv/bin/fpo-train", "a=1"]) == "fpo-train a=1 ckpt_path=last"
