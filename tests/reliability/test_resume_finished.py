"""A run killed after training (during its evaluation, or before its job status was
written) and resumed from its final ``last.ckpt`` gets the final metrics back; a checkpoint
holding OmegaConf containers among its hyperparameters loads weights-only."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fpo.checkpoints import AtomicCheckpointIO
from fpo.testing import run_module

VOLATILE = ("run/", "per_sec", "time")


def stable_metrics(run: Path) -> dict[str, float]:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if not any(s in k for s in VOLATILE)}


def test_config_containers_in_a_checkpoint_load_weights_only(tmp_path):
    columns = OmegaConf.create({"chosen": "better", "nested": [{"a": 1}]})
    checkpoint = {"datamodule_hyper_parameters": {"columns": columns}, "w": torch.ones(2)}
    io = AtomicCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "last.ckpt")
    loaded = io.load_checkpoint(tmp_path / "last.ckpt")
    assert loaded["datamodule_hyper_parameters"]["columns"] == {
        "chosen": "better",
        "nested": [{"a": 1}],
    }
    assert checkpoint["datamodule_hyper_parameters"]["columns"] is columns  # not modified


def test_resuming_a_finished_run_gives_its_final_metrics(tmp_path):
    args = ("fpo.commands.train", f"paths.log_dir={tmp_path}", "experiment=smoke", "objective=dpo")
    first = run_module(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    again = run_module(*args, "ckpt_path=last")
    assert again.returncode == 0, again.stderr[-3000:]
    finished, resumed = sorted((tmp_path / "smoke" / "runs").iterdir())
    assert "val/rewards/accuracies" in stable_metrics(finished)
    assert stable_metrics(resumed) == stable_metrics(finished)
