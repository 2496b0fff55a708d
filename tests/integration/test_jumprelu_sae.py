"""A JumpReLU SAE in FPO's feature term: trained by `train_sae`, saved, loaded from its folder.

The feature term is the module's top-k over pooled SAE features; it must not depend on the
SAE's own activation function. Checked against the formula computed from the models' own
hidden states (`test_objective_module.naive_loss`), and the shipped JumpReLU asset against
its card.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_objective_module import (
    fixture_batch,
    make_module,
    naive_loss,
    naive_response_stats,
    perturbed_pair,
)

from fpo.models.tiny import build_tiny_model
from fpo.sae import load_sae
from fpo.sae_maker import cli as make_sae
from fpo.testing import compose_train, preset

HOOK = "blocks.0.hook_resid_post"  # test_objective_module.HOOK_LAYER
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "assets" / "sae" / "gemma3-270m-layer17-jumprelu"
TOPK = ROOT / "assets" / "sae" / "gemma3-270m-layer17"


@pytest.fixture(scope="module")
def jumprelu_folder(tmp_path_factory) -> Path:
    """``fpo-make-sae --architecture jumprelu`` on the tiny model's layer 0 (d_in 32,
    d_sae 64, target L0 8), saved as float16 like the shipped one."""
    folder = tmp_path_factory.mktemp("sae") / "jumprelu"
    argv = ["--model", "tiny", "--architecture", "jumprelu", "--layer", "0", "--d-sae", "64",
            "--k", "8", "--tokens", "3000", "--heldout-tokens", "500", "--epochs", "4",
            "--batch-size", "64", "--lr", "1e-2", "--out", str(folder)]  # fmt: skip
    card = make_sae.run(argv)
    assert card["title"].startswith("JumpReLU SAE")
    assert card["architecture"] == "jumprelu (quadratic L0 loss, target L0 8)"
    assert 0 < card["L0 (held-out)"] < 64
    return folder


def test_trained_jumprelu_folder_loads_as_jumprelu_with_unit_decoder(jumprelu_folder):
    sae = load_sae(path=str(jumprelu_folder))
    assert sae.cfg.architecture() == "jumprelu"
    assert sae.cfg.metadata.hook_name == HOOK
    assert (sae.threshold > 0).all(), "a trained JumpReLU keeps positive thresholds"
    norms = sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-3, rtol=0)


@pytest.mark.parametrize("normalize", [False, True])
def test_fpo_loss_with_a_jumprelu_sae_equals_the_formula(
    normalize, jumprelu_folder, tiny_tokenizer, fixtures_dir
):
    """Policy != reference, so some features cross their thresholds between the two."""
    sae = load_sae(path=str(jumprelu_folder))
    objective = preset(
        "fpo",
        "objective.constraints.features.k=12",
        f"objective.constraints.features.normalize={str(normalize).lower()}",
    )
    torch.manual_seed(0)
    policy, reference = perturbed_pair(build_tiny_model())
    batch = fixture_batch(tiny_tokenizer, fixtures_dir)
    module = make_module(objective, policy, reference, sae, HOOK)
    result, _ = module.preference_step(batch)
    with torch.no_grad():
        ref_stats = naive_response_stats(reference, batch)
        pol_stats = naive_response_stats(policy, batch)
        expected = naive_loss(objective, pol_stats, ref_stats, sae)
        ref_features = sae.encode(ref_stats["hidden"][ref_stats["mask"]])
    active = (ref_features > 0).sum(-1).float().mean()
    assert 0 < active < sae.cfg.d_sae, "the SAE must fire on some features, not all"
    torch.testing.assert_close(result.losses, expected, atol=1e-5, rtol=1e-5)
    # D trains the policy through the JumpReLU (a detached encoding would leave it constant)
    policy.zero_grad()
    _, stats = module.preference_step(batch)
    assert (stats["fmse"] > 0).all()
    stats["fmse"].sum().backward()
    grad = policy.model.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def card_fields(folder: Path) -> dict[str, str]:
    text = (folder / "SAE_CARD.md").read_text(encoding="utf-8")
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", text, flags=re.M))


def test_shipped_jumprelu_sae_matches_its_card_and_the_topk_width():
    cfg = compose_train("sae=gemma3_270m_l17_jumprelu")
    sae = instantiate(cfg.sae.loader)
    card = card_fields(SHIPPED)
    topk = load_sae(path=str(TOPK))
    assert sae.cfg.architecture() == "jumprelu"
    assert card["architecture"].startswith("jumprelu")
    assert int(sae.cfg.d_sae) == int(card["d_sae"]) == int(topk.cfg.d_sae) == 2048
    assert int(sae.cfg.d_in) == int(card["d_in"]) == 640
    assert sae.cfg.metadata.hook_name == card["hook_name"] == topk.cfg.metadata.hook_name
    assert (sae.threshold > 0).all()
    assert abs(float(card["L0 (held-out)"]) - 64) < 16, "the card's L0 near the TopK's 64"
    assert sum(p.stat().st_size for p in SHIPPED.iterdir()) < 8e6, "float16, a few MB"
