"""``model.packed=true`` through ``build_run_parts``: a Lightning training step gives the loss
of the padded run (policy and online reference packed, SAE features included)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fpo.builder import build_run_parts
from fpo.packing import Packing
from fpo.testing import QUIET_TRAINER, compose_train


class FirstLoss(L.Callback):
    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.grads = {n: p.grad.clone() for n, p in module.policy.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.loss = float(outputs["loss"])  # the module frees the gradients after the step


def first_step(objective: str, packed: bool, tmp_path, *extra: str) -> FirstLoss:
    cfg = compose_train(
        "experiment=smoke",
        f"paths.output_dir={tmp_path}",
        f"objective={objective}",
        f"model.packed={str(packed).lower()}",
        "callbacks=none",
        "~scheduler",
        "optimizer._target_=torch.optim.SGD",
        "~optimizer.weight_decay",
        "data.batch_size=4",
        "data.shuffle=false",
        *extra,
    )
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    module.sae_report_batches = 0
    want = Packing() if packed else None
    assert module.packing == want
    if module.reference is not None:
        assert module.reference.packing == want
    capture = FirstLoss()
    trainer = experiment.build_trainer(callbacks=[capture], max_steps=1, **QUIET_TRAINER)
    trainer.fit(module, datamodule=experiment.datamodule)
    return capture


@pytest.mark.parametrize(
    ("objective", "extra"),
    [("fpo", ()), ("tdpo1", ()), ("simpo", ()), ("dpo", ("model.gradient_checkpointing=true",))],
)
def test_packed_training_step_matches_padded(objective, extra, tmp_path):
    padded = first_step(objective, False, tmp_path, *extra)
    packed = first_step(objective, True, tmp_path, *extra)
    assert padded.loss == pytest.approx(packed.loss, abs=1e-5)
    assert any(g.abs().sum() > 0 for g in padded.grads.values())
    for name, grad in padded.grads.items():
        torch.testing.assert_close(packed.grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
