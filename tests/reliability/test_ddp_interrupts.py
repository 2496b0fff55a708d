"""SIGTERM under DDP (two gloo processes on the CPU, the tiny model): every rank stops after
the same optimizer step, ``last.ckpt`` holds that step, both ranks exit 143 (no rank waits
forever in a collective), and ``ckpt_path=last`` resumes in the middle of the epoch to the
uninterrupted run's weights and metrics.

Lightning's own SIGTERM handler (2.6) broadcasts inside the handler and forwards the signal
to the rank it launched; a SIGTERM to both ranks hung for more than 10 minutes
(`fpo.stop_together.StopTogether` replaces it). Every run here has a hard timeout.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fpo.stop_together import StopTogether
from fpo.testing import run_module

# 8 pairs, 1 per rank per step: 4 optimizer steps an epoch, 2 epochs; stopped after step 2
# of epoch 0, before the first periodic save (step 3).
DDP = (
    "experiment=smoke",
    "objective=dpo",
    "data.batch_size=1",
    "trainer.precision=32-true",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "callbacks.last_checkpoint.every_n_train_steps=3",
)
STOP_STEP = 2
TIMEOUT = 300  # seconds: a hang fails the test instead of stalling the suite
VOLATILE = ("run/", "per_sec", "time")


def train(run: Path, *extra: str):
    return run_module(
        "fpo.commands.train",
        *DDP,
        f"paths.log_dir={run.parent / 'logs'}",
        f"hydra.run.dir={run}",
        *extra,
        timeout=TIMEOUT,
    )


def sigterm_after(step: int, rank: int | None) -> tuple[str, ...]:
    only = () if rank is None else (f"+callbacks.stop.rank={rank}",)
    return (
        "+callbacks.stop._target_=fpo.testing.faults.SignalAfterStep",
        f"+callbacks.stop.step={step}",
        "+callbacks.stop.name=SIGTERM",
        *only,
    )


def run_popen(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code])


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def stable_metrics(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not any(s in k for s in VOLATILE)}


def step_losses(run: Path) -> dict[int, float]:
    """``train/loss`` per optimizer step of the run's newest CSV log."""
    log = max(run.glob("csv/version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    with log.open() as f:
        rows = list(csv.DictReader(f))
    return {int(r["step"]): float(r["train/loss"]) for r in rows if r["train/loss"]}


def check_stopped(run: Path, result) -> None:
    assert result.returncode == 143, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert "interrupted by SIGTERM" in result.stderr
    assert "Rank 1 exited with status 143." in result.stderr  # the other rank, waited for
    last = load(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == STOP_STEP
    position = last["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert position == [{"epoch": 0, "batches": STOP_STEP}]  # in the middle of epoch 0
    assert not (run / "metrics.json").exists()


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> Path:
    """A run whose two ranks both got SIGTERM after step 2."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    check_stopped(run, train(run, *sigterm_after(STOP_STEP, rank=None)))
    return run


def test_sigterm_to_both_ranks_stops_them_after_the_same_step_with_143(stopped):
    assert (stopped / "checkpoints" / "last.ckpt").is_file()  # checked by the fixture


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1], ids=["rank0-only", "rank1-only"])
def test_sigterm_to_one_rank_stops_every_rank(tmp_path, rank):
    """A scheduler that signals only the launching process (rank 0), or only rank 1."""
    run = tmp_path / "run"
    check_stopped(run, train(run, *sigterm_after(STOP_STEP, rank=rank)))


@pytest.mark.slow
def test_a_stopped_ddp_run_resumes_mid_epoch_to_the_uninterrupted_result(stopped, tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    result = train(uninterrupted)
    assert result.returncode == 0, result.stderr[-4000:]

    resumed = tmp_path / "resumed"  # the stopped run's folder, resumed in place
    shutil.copytree(stopped, resumed)
    result = train(resumed, "ckpt_path=last")
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"resuming from {resumed / 'checkpoints' / 'last.ckpt'}" in result.stderr + result.stdout

    # It went on from step 2 of epoch 0 (not from the next epoch), with the same losses.
    full, rest = step_losses(uninterrupted), step_losses(resumed)
    assert sorted(full) == list(range(8)), full
    assert rest == {step: full[step] for step in range(STOP_STEP, 8)}
    assert stable_metrics(resumed) == stable_metrics(uninterrupted)
    weights = load(resumed / "checkpoints" / "last.ckpt")["state_dict"]
    expected = load(uninterrupted / "checkpoints" / "last.ckpt")["state_dict"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


class Strategy:
    """A DDP strategy stand-in: ``other_rank`` is the note of the other rank."""

    def __init__(self, other_rank: bool, procs: list) -> None:
        self.other_rank, self.launcher, self.reductions = (
            other_rank,
            SimpleNamespace(procs=procs),
            0,
        )

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        self.reductions += 1
        return decision or self.other_rank


def test_a_signal_on_another_rank_stops_this_one_and_hands_it_the_launched_ranks():
    """Unit check of `StopTogether` with stand-ins (no processes but the two children)."""
    exits = run_popen("import sys; sys.exit(143)")
    hangs = run_popen("import time; time.sleep(60)")
    procs = [exits, hangs]  # the list Lightning's observer thread watches
    strategy = Strategy(other_rank=False, procs=procs)
    trainer = SimpleNamespace(
        global_step=1,
        global_rank=0,
        strategy=strategy,
        _signal_connector=SimpleNamespace(received_sigterm=False),
    )
    together = StopTogether(timeout=2)
    together.on_train_batch_end(trainer, None, None, None, 0)
    assert not trainer._signal_connector.received_sigterm and procs == [exits, hangs]

    strategy.other_rank = True  # rank 1 got SIGTERM during the next micro-batch
    together.on_train_batch_end(trainer, None, None, None, 1)  # same step: accumulating
    assert strategy.reductions == 1 and not trainer._signal_connector.received_sigterm

    trainer.global_step = 2
    together.on_train_batch_end(trainer, None, None, None, 2)
    assert trainer._signal_connector.received_sigterm
    assert procs == [] and together.children == [exits, hangs]  # the observer sees none
    assert together.wait_for_children() == {1: 143, 2: -9}  # the hung one killed after 2 s
