"""After fit: the optimizer state is freed (the checkpoints keep it), and the evaluation runs
on the training device, not where Lightning's teardown leaves the policy (the CPU)."""

from __future__ import annotations

import pytest
import torch

import fpo.evaluation.after_fit as after_fit
from fpo.builder import build_run_parts
from fpo.commands.eval import eval_device
from fpo.commands.train import train
from fpo.errors import UserError
from fpo.testing import compose_train

SMOKE = ("experiment=smoke", "objective=fpo", "data.batch_size=2")


def test_fit_frees_the_optimizer_state_after_the_last_checkpoint_saved_it(tmp_path):
    cfg = compose_train(*SMOKE, f"paths.output_dir={tmp_path}", "logger=csv")
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    trainer = experiment.build_trainer(
        max_steps=2, limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(module, datamodule=experiment.datamodule)

    assert trainer.optimizers[0].state == {}
    assert all(p.grad is None for p in module.policy.parameters())
    (last,) = tmp_path.rglob("last.ckpt")
    saved = torch.load(last, weights_only=False)["optimizer_states"][0]["state"]
    assert saved and all("exp_avg" in s for s in saved.values())


def test_fpo_train_evaluates_on_the_training_device(tmp_path, monkeypatch):
    seen = {}

    def record(policy, reference, run, loggers, device=None):
        seen["device"] = device
        return {}

    monkeypatch.setattr(after_fit, "evaluate_run", record)
    cfg = compose_train(
        *SMOKE, f"paths.output_dir={tmp_path}", "evaluation=smoke", "trainer.max_epochs=1"
    )
    train(cfg)
    assert seen["device"] == torch.device("cpu")  # the strategy's root device here


class Stop(Exception):
    pass


def test_evaluation_moves_policy_reference_and_sae_to_the_device(tmp_path, monkeypatch):
    """``device="meta"`` stands in for a GPU: every model must land there before use."""
    seen = {}

    def sample_and_judge(policy, reference, *args, **kwargs):
        seen["policy"] = next(policy.parameters()).device
        seen["reference"] = next(reference.parameters()).device
        return {"settings": {}}

    def heldout_pair_metrics(policy, reference, loader, objective, sae=None, **kwargs):
        seen["sae"] = next(sae.parameters()).device
        raise Stop

    monkeypatch.setattr(after_fit, "sample_and_judge", sample_and_judge)
    monkeypatch.setattr(after_fit, "heldout_pair_metrics", heldout_pair_metrics)
    cfg = compose_train(*SMOKE, f"paths.output_dir={tmp_path}", "evaluation=smoke")
    parts = build_run_parts(cfg)
    run, reference = parts.evaluation_inputs(), parts.load_reference_model()
    with pytest.raises(Stop):
        after_fit.evaluate_run(parts.policy, reference, run, [], device="meta")
    assert seen == {name: torch.device("meta") for name in ("policy", "reference", "sae")}


def test_fpo_eval_device_defaults_to_what_is_there_and_names_a_bad_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert eval_device({"device": None}).type == expected
    assert eval_device({"device": "cpu"}) == torch.device("cpu")
    with pytest.raises(UserError, match="device='gpu0'"):
        eval_device({"device": "gpu0"})
