"""Two DDP processes (gloo, CPU) train exactly like one process with the same global batch.

One process: 2 pairs per micro-batch x 2 accumulation steps; two processes: 2 pairs per
rank x 2 ranks; global batch 4 pairs, 2 shuffled epochs of the 8 fixture pairs (4 optimizer
steps). ``fpo.data.sampler.GlobalBatchSampler`` gives both the same order and the same 4
pairs per optimizer step (Lightning's own DistributedSampler would reshuffle and deal
round-robin). The per-step train loss and every final train/val metric must agree to
float32 round-off of a different reduction order (rtol 1e-4, atol 1e-5; on this machine
they are bit-identical).

FPO reads its reference from the offline cache (built once, by one process): this checks
that the cache's rows join to each rank's shard of the data. TDPO-2 runs the online
reference (full-vocabulary token KL) on each rank, once with a full policy and once with LoRA
adapters (the reference: the same DDP-wrapped model with its adapters off).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fpo.testing import run_module

COMMON = (
    "experiment=smoke",
    "data.batch_size=2",
    "data.eval_batch_size=2",
    "trainer.precision=32-true",
)
TRAIN = ("step.global_batch_size=4",)
DDP = ("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
RTOL, ATOL = 1e-4, 1e-5


def run(module: str, tmp_path: Path, run_dir: Path, *overrides: str) -> None:
    result = run_module(
        module,
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={run_dir}",
        *COMMON,
        *overrides,
    )
    assert result.returncode == 0, result.stderr[-4000:]


def step_losses(run_dir: Path) -> dict[int, float]:
    (log,) = run_dir.glob("csv/version_0/metrics.csv")
    with log.open() as f:
        return {
            int(row["step"]): float(row["train/loss"])
            for row in csv.DictReader(f)
            if row.get("train/loss")
        }


def metrics(run_dir: Path) -> dict[str, float]:
    values = json.loads((run_dir / "metrics.json").read_text())
    return {
        k: v
        for k, v in values.items()
        if k.startswith(("train/", "val/"))
        and "/device/" not in k
        and "per_sec" not in k
        and "batches" not in k
    }


#: LoRA adapters, the reference their adapter-free base; no adapter dropout, whose masks would
#: come from each rank's generator instead of in sequence from the one process's.
LORA = ("model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0")


@pytest.mark.parametrize(
    ("objective", "reference", "extra"),
    [("fpo", "cached", ()), ("tdpo2", "online", ()), ("tdpo2", "online", LORA)],
    ids=["fpo-cache", "tdpo2", "tdpo2-lora"],
)
def test_two_ddp_processes_equal_one_process(tmp_path, objective, reference, extra):
    overrides = (f"objective={objective}", f"reference={reference}", *extra)
    if reference == "cached":
        run("fpo.commands.cache", tmp_path, tmp_path / "cache_run", *overrides)
    single, double = tmp_path / "single", tmp_path / "ddp"
    run("fpo.commands.train", tmp_path, single, *TRAIN, *overrides)
    run("fpo.commands.train", tmp_path, double, *TRAIN, *overrides, *DDP)

    losses_single, losses_double = step_losses(single), step_losses(double)
    assert sorted(losses_single) == sorted(losses_double) == [0, 1, 2, 3], losses_double
    for step, loss in losses_single.items():
        assert math.isclose(losses_double[step], loss, rel_tol=RTOL, abs_tol=ATOL), step
    # The loss moved: the steps did update the policy (identical updates on both sides).
    assert losses_single[3] != pytest.approx(losses_single[0], abs=1e-4)

    final_single, final_double = metrics(single), metrics(double)
    assert set(final_single) == set(final_double)
    required = {"train/loss", "val/loss", "val/rewards/accuracies", "val/rewards/margins"}
    required |= {"val/fmse/rejected"} if objective == "fpo" else {"val/kl/rejected"}
    assert required <= set(final_single), sorted(final_single)
    for name, value in final_single.items():
        assert math.isclose(final_double[name], value, rel_tol=RTOL, abs_tol=ATOL), name


def test_ddp_jobs_in_a_sweep_each_start_their_own_ranks(tmp_path):
    """Lightning's DDP launcher re-executes the command line: in a multirun that is the whole
    sweep, and a second job found the first one's LOCAL_RANK and waited forever for ranks it
    never started (fpo.sweep gives each job its own single-run command and environment)."""
    result = run_module(
        *("fpo.commands.train", "-m", f"paths.log_dir={tmp_path}"),
        *("experiment=smoke", "objective=dpo,simpo", "trainer.precision=32-true", *DDP),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (sweep_dir,) = (tmp_path / "smoke" / "multiruns").iterdir()
    jobs = json.loads((sweep_dir / "sweep_summary.json").read_text())["jobs"]
    assert [job["status"] for job in jobs] == ["finished", "finished"]
    for job in jobs:  # rank 1 ran in the job's own folder, as a single run
        assert (sweep_dir / job["dir"] / "train_ddp_process_1.log").exists(), job["dir"]
