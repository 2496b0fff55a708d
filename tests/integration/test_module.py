"""The real Lightning loop on the tiny model: every objective trains and logs its metrics."""

from __future__ import annotations

import copy
import csv
import math
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch

from fpo.builder import StepSettings, assemble_module, frozen_copy, online_reference
from fpo.reference.base import OnlineReference
from fpo.sae import build_random_sae
from fpo.testing import PRESETS, fixture_datamodule, preset

HOOK = "blocks.1.hook_resid_post"


def make_datamodule(tokenizer, fixtures_dir, batch_size=2, shuffle=True):
    return fixture_datamodule(tokenizer, fixtures_dir, batch_size=batch_size, shuffle=shuffle)


def make_module(name, model, lr=1e-3, chunk=None, optimizer=torch.optim.AdamW):
    objective = preset(name, "objective.constraints.features.k=16")
    needs = objective.needs
    sae = build_random_sae(d_in=32, d_sae=64, k=8, hook_name=HOOK)
    reference = None
    if needs.reference:
        reference = online_reference(frozen_copy(model), objective, sae=sae, hook_name=HOOK)
    return assemble_module(
        model,
        objective,
        partial(optimizer, lr=lr),
        reference=reference,
        sae=sae,
        hook_name=HOOK,
        step=StepSettings(logits_chunk_size=chunk),
    )


@pytest.mark.parametrize("name", PRESETS)
def test_short_fit_changes_policy_and_logs_metrics(
    name, tiny_model, tiny_tokenizer, fixtures_dir, tmp_path
):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    module = make_module(name, tiny_model, chunk=16)
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="csv")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=make_datamodule(tiny_tokenizer, fixtures_dir))

    changed = [k for k, v in tiny_model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > len(before) // 2, "most policy tensors must move"
    if isinstance(module.reference, OnlineReference):
        for k, v in module.reference.model.state_dict().items():
            assert torch.equal(v, before[k]), f"reference weight {k} changed"

    with open(Path(logger.log_dir) / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    expected = {
        f"val/{m}" for m in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen")
    }
    expected |= {"train/loss", "train/rewards/chosen"}
    if name.startswith("tdpo"):
        expected |= {"val/kl/chosen", "val/kl/rejected"}
    if name == "fpo":
        expected |= {"val/fmse/chosen", "val/fmse/rejected", "sae/variance_explained", "sae/l0"}
    assert expected <= columns, expected - columns
    metrics = trainer.callback_metrics
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("name", ["dpo", "fpo", "tdpo1"])
def test_loss_is_ln2_when_policy_equals_reference(name, tiny_model, tiny_tokenizer, fixtures_dir):
    """At step 0 the policy is the reference: every margin is zero, the loss is ln 2."""
    module = make_module(name, tiny_model)
    tiny_model.eval()
    datamodule = make_datamodule(tiny_tokenizer, fixtures_dir, batch_size=4)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    result, stats = module.preference_step(batch)
    torch.testing.assert_close(result.losses, torch.full((4,), math.log(2)), atol=1e-5, rtol=0)
    if name == "tdpo1":
        torch.testing.assert_close(stats["kl"], torch.zeros(8), atol=1e-5, rtol=0)
    if name == "fpo":
        torch.testing.assert_close(stats["fmse"], torch.zeros(8), atol=1e-6, rtol=0)


class GradientCapture(L.Callback):
    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads = {n: p.grad.clone() for n, p in pl_module.policy.named_parameters()}


def gradients_of_first_step(model, tokenizer, fixtures_dir, batch_size, accumulate):
    module = make_module("fpo", model, optimizer=torch.optim.SGD, lr=0.0)
    capture = GradientCapture()
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accumulate_grad_batches=accumulate,
        callbacks=[capture],
        limit_val_batches=0,
    )
    datamodule = make_datamodule(tokenizer, fixtures_dir, batch_size=batch_size, shuffle=False)
    trainer.fit(module, datamodule=datamodule)
    return capture.grads


def test_gradient_accumulation_matches_larger_batch(tiny_model, tiny_tokenizer, fixtures_dir):
    model_a = copy.deepcopy(tiny_model)
    model_b = copy.deepcopy(tiny_model)
    accumulated = gradients_of_first_step(model_a, tiny_tokenizer, fixtures_dir, 1, 2)
    whole = gradients_of_first_step(model_b, tiny_tokenizer, fixtures_dir, 2, 1)
    assert any(g.abs().sum() > 0 for g in whole.values())
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_checkpoint_holds_policy_only(tiny_model, tiny_tokenizer, fixtures_dir, tmp_path):
    module = make_module("fpo", tiny_model)
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=make_datamodule(tiny_tokenizer, fixtures_dir))
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert any(k.startswith("policy.") for k in state)
    assert not any(k.startswith(("reference.", "sae.")) for k in state)
