"""Composed objectives (fpo.objective): presets equal the published formulas, terms declare
what they need, validation names the problem, and the config schema refuses typos."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import ConfigCompositionException

from fpo import losses
from fpo.errors import UserError
from fpo.logprobs import SequenceLogps
from fpo.objective import Needs, build_objective
from fpo.sae import build_random_sae
from fpo.testing import compose_train

B = 5


def compose_objective(*overrides: str):
    return compose_train(*overrides).objective


def random_logps(generator) -> SequenceLogps:
    n_tokens = torch.randint(1, 20, (2 * B,), generator=generator)
    summed = -torch.rand(2 * B, generator=generator) * n_tokens
    return SequenceLogps(summed, summed / n_tokens, n_tokens)


@pytest.fixture
def values():
    generator = torch.Generator().manual_seed(0)
    return {
        "policy": random_logps(generator),
        "reference": random_logps(generator),
        "kl": torch.rand(2 * B, generator=generator),
        "fmse": 10 * torch.rand(2 * B, generator=generator),
    }


def halves(x):
    return x.chunk(2)


@pytest.mark.parametrize("name", ["dpo", "simpo", "tdpo1", "tdpo2", "fpo"])
def test_presets_are_the_published_losses(name, values):
    objective = build_objective(compose_objective(f"objective={name}"))
    policy, reference = values["policy"], values["reference"]
    stats = {"kl": values["kl"], "fmse": values["fmse"]}
    got = objective.loss(policy, reference, stats)
    if name == "dpo":
        want = losses.dpo_loss(*halves(policy.sum), *halves(reference.sum), beta=0.1)
    elif name == "simpo":  # beta 2, gamma_beta_ratio 0.5 -> a reward margin of 1.0
        want = losses.simpo_loss(*halves(policy.avg), beta=2.0, gamma=1.0)
    elif name.startswith("tdpo"):
        pw, pl = halves(policy.sum - reference.sum)
        want = losses.tdpo_loss(
            pw, pl, *halves(values["kl"]), beta=0.1, alpha=0.5, version=int(name[-1])
        )
    else:
        want = losses.fpo_loss(
            *halves(policy.avg),
            *halves(reference.avg),
            *halves(values["fmse"]),
            beta=0.1,
            alpha=0.5,
        )
    for field in got._fields:
        torch.testing.assert_close(getattr(got, field), getattr(want, field), msg=field)


@pytest.mark.parametrize(
    ("name", "needs", "field"),
    [
        ("dpo", Needs(reference_logps=True), "sum"),
        ("simpo", Needs(), "avg"),
        ("tdpo1", Needs(reference_logps=True, reference_logits=True), "sum"),
        ("tdpo2", Needs(reference_logps=True, reference_logits=True), "sum"),
        ("fpo", Needs(reference_logps=True, features=True), "avg"),
    ],
)
def test_presets_declare_what_they_need(name, needs, field):
    objective = build_objective(compose_objective(f"objective={name}"))
    assert objective.needs == needs
    assert objective.logps_field == field
    assert objective.feature_k == (50 if name == "fpo" else 0)


@pytest.mark.parametrize("term", ["token_kl", "features"])
@pytest.mark.parametrize("stop_gradient", [True, False])
def test_stop_gradient_switch_reaches_the_chosen_term(term, stop_gradient, values):
    objective = build_objective(
        {
            "margin": "ln_dpo",
            "constraints": {term: {"alpha": 0.7, "stop_gradient": stop_gradient}},
        }
    )
    stat = "kl" if term == "token_kl" else "fmse"
    penalty = values[stat].clone().requires_grad_(True)
    losses = objective.loss(values["policy"], values["reference"], {stat: penalty}).losses
    (grad,) = torch.autograd.grad(losses.sum(), penalty)
    chosen, rejected = grad.chunk(2)
    assert (rejected.abs() > 0).all(), "the rejected term always trains"
    assert (chosen.abs() > 0).all() != stop_gradient


def test_alpha_zero_switches_a_term_off(values):
    off = build_objective({"margin": "ln_dpo", "constraints": {"features": {"alpha": 0.0}}})
    assert off.needs == Needs(reference_logps=True) and off.feature_k == 0
    got = off.loss(values["policy"], values["reference"], {})
    want = losses.preference_loss(*halves(values["policy"].avg - values["reference"].avg), beta=0.1)
    torch.testing.assert_close(got.losses, want.losses)


def test_token_kl_rewards_include_the_kl_features_do_not(values):
    stats = {"kl": values["kl"], "fmse": values["fmse"]}
    policy, reference = values["policy"], values["reference"]
    both = build_objective(
        {"constraints": {"token_kl": {"alpha": 0.5}, "features": {"alpha": 0.5}}}
    ).loss(policy, reference, stats)
    kw, _ = halves(values["kl"])
    pw, _ = halves(policy.sum - reference.sum)
    torch.testing.assert_close(both.chosen_rewards, 0.1 * (pw + kw))


def test_validation_names_the_problem():
    sae = build_random_sae(d_in=8, d_sae=16, hook_name="blocks.0.hook_resid_post")
    features = build_objective({"constraints": {"features": {"alpha": 1.0, "k": 32}}})
    with pytest.raises(UserError, match="needs an SAE"):
        features.validate(sae=None, cached_reference=False)
    with pytest.raises(UserError, match=r"features.k=32 .* d_sae=16"):
        features.validate(sae=sae, cached_reference=False)
    token_kl = build_objective({"constraints": {"token_kl": {"alpha": 1.0}}})
    with pytest.raises(UserError, match="reference=online"):
        token_kl.validate(sae=None, cached_reference=True)
    with pytest.raises(UserError, match="gamma_beta_ratio"):
        build_objective({"margin": "dpo", "gamma_beta_ratio": 0.5}).validate(
            sae=None, cached_reference=False
        )


@pytest.mark.parametrize(
    ("mapping", "match"),
    [
        ({"bta": 0.1}, "'bta'"),
        ({"constraints": {"features": {"alhpa": 1}}}, "'alhpa'"),
        ({"margin": "ipo"}, "ipo"),
    ],
)
def test_bad_objective_keys_are_refused_with_the_valid_ones(mapping, match):
    with pytest.raises(UserError, match=match) as error:
        build_objective(mapping)
    assert "gamma_beta_ratio" in str(error.value)  # the valid keys are listed


def test_a_typo_fails_when_the_config_is_composed():
    with pytest.raises(ConfigCompositionException) as error:
        compose_objective("objective=fpo", "objective.constraints.features.alhpa=0.1")
    assert "alhpa" in str(error.value.__cause__ or error.value)


def test_new_combinations_compose_from_config_alone():
    cfg = compose_objective("objective=simpo", "objective.constraints.features.alpha=0.5")
    objective = build_objective(cfg)
    assert objective.needs == Needs(features=True)
    assert objective.feature_k == 50 and objective.beta == 2.0


@pytest.mark.parametrize(("sae", "alpha"), [("random", 0.5), ("gemma3_270m_l17", 1e-4)])
def test_fpo_takes_its_alpha_from_the_sae_config(sae, alpha):
    """FPO's alpha is ``${sae.feature_alpha}``, read in the composed config the objective node
    belongs to; without it the objective is refused (no silent fallback)."""
    objective = build_objective(compose_objective("objective=fpo", f"sae={sae}"))
    assert objective.constraints.features.alpha == alpha
    with pytest.raises(UserError, match=r"sae\.feature_alpha"):
        build_objective(compose_objective("objective=fpo", "~sae.feature_alpha"))
