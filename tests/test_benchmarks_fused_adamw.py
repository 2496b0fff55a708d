"""The module's AdamW is fused when nothing else was configured (issue 11: the foreach step's
temporaries cost about 1 GiB of peak memory on gemma-3-270m), and the update is the same."""

from __future__ import annotations

from functools import partial

import torch

from fpo.builder import assemble_module
from fpo.models.tiny import load_tiny
from fpo.module import fused_kwargs
from fpo.objective import build_objective

SIMPO = build_objective({"name": "simpo", "margin": "simpo", "beta": 2.0, "gamma_beta_ratio": 0.5})


def _module(factory):
    model, _ = load_tiny()
    return assemble_module(model, SIMPO, factory)


def test_adamw_is_fused_by_default():
    optimizer = _module(partial(torch.optim.AdamW, lr=1e-3)).configure_optimizers()
    assert optimizer.defaults["fused"] is True


def test_explicit_choice_and_other_optimizers_are_kept():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_kwargs(partial(torch.optim.AdamW, lr=1e-3, foreach=True), params) == {}
    assert fused_kwargs(partial(torch.optim.AdamW, lr=1e-3, fused=False), params) == {}
    assert fused_kwargs(partial(torch.optim.SGD, lr=1e-3), params) == {}
    optimizer = _module(partial(torch.optim.AdamW, lr=1e-3, fused=False)).configure_optimizers()
    assert not optimizer.defaults["fused"]


def test_fused_update_equals_the_foreach_update():
    torch.manual_seed(0)
    weights = [torch.randn(64, 32), torch.randn(32)]
    grads = [torch.randn_like(w) for w in weights]
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        optimizer = torch.optim.AdamW(params, lr=1e-3, fused=fused, foreach=not fused)
        for _ in range(3):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
