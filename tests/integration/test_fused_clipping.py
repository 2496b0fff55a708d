"""Under ``bf16-mixed`` with gradient clipping the module keeps the fused AdamW (issue 11: the
foreach step cost ~45 ms of a 0.53 s step on the Gemma-2-2B shape on an H100) and clips
the gradients itself, as Lightning's own clipping would with the foreach AdamW."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fpo.builder import build_run_parts
from fpo.testing import QUIET_TRAINER, compose_train

CLIP = 1e-3  # far below the tiny model's gradient norm: clipping decides the update


def train(tmp_path, clip: float | None, *extra: str) -> tuple[torch.optim.Optimizer, dict]:
    """Three SimPO steps of the smoke experiment under bf16-mixed on the CPU; the optimizer
    and the policy's final weights."""
    cfg = compose_train(
        "experiment=smoke",
        f"paths.output_dir={tmp_path}",
        "objective=simpo",
        "callbacks=none",
        "~scheduler",
        "optimizer.lr=1e-3",
        "data.batch_size=2",
        "data.shuffle=false",
        *extra,
    )
    experiment = build_run_parts(cfg)
    module = experiment.build_module()
    module.sae_report_batches = 0
    trainer = experiment.build_trainer(
        max_steps=3, precision="bf16-mixed", gradient_clip_val=clip, **QUIET_TRAINER
    )
    trainer.fit(module, datamodule=experiment.datamodule)
    weights = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    return trainer.optimizers[0], weights


def largest_difference(a: dict, b: dict) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_bf16_clipping_keeps_the_fused_adamw_and_clips_like_lightning(tmp_path):
    fused, fused_weights = train(tmp_path / "fused", CLIP)
    assert fused.defaults["fused"] is True
    # the same run with the foreach AdamW, clipped by Lightning's own mixed-precision plugin
    foreach, foreach_weights = train(tmp_path / "foreach", CLIP, "+optimizer.foreach=true")
    assert not foreach.defaults["fused"]
    _, unclipped_weights = train(tmp_path / "unclipped", None)
    same = largest_difference(fused_weights, foreach_weights)
    clipping = largest_difference(unclipped_weights, foreach_weights)
    assert clipping > 1e-4  # the clip matters in this setting
    assert same < clipping / 20, (same, clipping)


def test_fp16_loss_scaling_with_clipping_keeps_the_foreach_adamw(tmp_path):
    """A fused AdamW unscales fp16 gradients inside its step, after clipping saw them."""
    cfg = compose_train("experiment=smoke", f"paths.output_dir={tmp_path}", "objective=simpo")
    module = build_run_parts(cfg).build_module()
    scaler = SimpleNamespace(scale=lambda x: x)
    module._trainer = SimpleNamespace(
        gradient_clip_val=1.0, precision_plugin=SimpleNamespace(scaler=scaler)
    )
    assert not module.configure_optimizers()["optimizer"].defaults["fused"]
    module._trainer.precision_plugin = SimpleNamespace(scaler=None)  # bf16: no scaler
    assert module.configure_optimizers()["optimizer"].defaults["fused"] is True


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_fused_bf16_clipping_follows_the_configured_algorithm(tmp_path, algorithm):
    from lightning.pytorch.plugins.precision import MixedPrecision

    cfg = compose_train("experiment=smoke", f"paths.output_dir={tmp_path}", "objective=simpo")
    module = build_run_parts(cfg).build_module()
    plugin = MixedPrecision("bf16-mixed", "cpu")
    module._trainer = SimpleNamespace(
        gradient_clip_val=0.5, precision_plugin=plugin, strategy=SimpleNamespace(model=None)
    )
    optimizer = torch.optim.AdamW(module.policy.parameters(), fused=True)
    for p in module.policy.parameters():
        p.grad = torch.full_like(p, 3.0)
    module.configure_gradient_clipping(optimizer, 0.5, algorithm)
    grads = [p.grad for p in module.policy.parameters()]
    if algorithm == "value":
        assert all(torch.all(g == 0.5) for g in grads)
    else:
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert total.item() == pytest.approx(0.5, rel=1e-4)


def test_an_explicitly_fused_optimizer_under_fp16_clipping_is_refused_by_name(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    from fpo.errors import UserError

    cfg = compose_train("experiment=smoke", f"paths.output_dir={tmp_path}", "objective=simpo")
    module = build_run_parts(cfg).build_module()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    module._trainer = SimpleNamespace(
        gradient_clip_val=1.0, precision_plugin=plugin, strategy=SimpleNamespace(model=None)
    )
    optimizer = torch.optim.AdamW(module.policy.parameters(), fused=True)
    with pytest.raises(UserError, match=r"optimizer\.fused=true with trainer\.precision=16-mixed"):
        module.configure_gradient_clipping(optimizer, 1.0, "norm")
