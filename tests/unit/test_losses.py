"""Unit tests for fpo.losses: hand-computed values, stop-gradients, gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from fpo.losses import (
    PreferenceLoss,
    dpo_loss,
    feature_mse,
    fpo_loss,
    simpo_loss,
    tdpo_loss,
)

LN2 = math.log(2.0)


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), the expected per-pair loss for logit x."""
    return math.log1p(math.exp(-x))


def t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


# --------------------------------------------------------------------------- hand values


def test_dpo_hand_values_and_ln2_when_policy_equals_reference():
    # pair 0: chosen logratio -10 - -11 = 1, rejected -12 - -11 = -1, margin 2,
    #         beta * margin = 0.5 * 2 = 1 -> loss log(1 + e^-1) = 0.3132617
    # pair 1: policy == reference -> margin 0 -> loss log 2
    out = dpo_loss(
        policy_chosen_logps=t(-10.0, -7.0),
        policy_rejected_logps=t(-12.0, -9.0),
        ref_chosen_logps=t(-11.0, -7.0),
        ref_rejected_logps=t(-11.0, -9.0),
        beta=0.5,
    )
    assert isinstance(out, PreferenceLoss)
    torch.testing.assert_close(out.losses, t(0.31326168751822286, LN2))
    # rewards: beta * logratio = 0.5 * 1, 0.5 * -1; zero for pair 1
    torch.testing.assert_close(out.chosen_rewards, t(0.5, 0.0))
    torch.testing.assert_close(out.rejected_rewards, t(-0.5, 0.0))


def test_simpo_hand_values():
    # pair 0: beta (pw - pl) - gamma = 2 * (-1 - -1.5) - 0.5 = 0.5 -> log(1 + e^-0.5) = 0.474077
    # pair 1: 2 * (-2 - -1) - 0.5 = -2.5 -> log(1 + e^2.5) = 2.578890
    out = simpo_loss(
        policy_chosen_logps=t(-1.0, -2.0), policy_rejected_logps=t(-1.5, -1.0), beta=2.0, gamma=0.5
    )
    torch.testing.assert_close(out.losses, t(0.47407698418010663, 2.5788897342925496))
    torch.testing.assert_close(out.chosen_rewards, t(-2.0, -4.0))  # beta * pw
    torch.testing.assert_close(out.rejected_rewards, t(-3.0, -2.0))  # beta * pl


def test_simpo_loss_decreases_with_margin_and_sign_of_margin():
    beta, gamma = 2.0, 0.5
    margins = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    out = simpo_loss(
        policy_chosen_logps=-1.0 + margins,
        policy_rejected_logps=torch.full_like(margins, -1.0),
        beta=beta,
        gamma=gamma,
    )
    assert torch.all(out.losses[1:] < out.losses[:-1])
    # loss < ln 2 exactly when beta * margin exceeds gamma, i.e. margin > 0.25
    assert torch.equal(out.losses < LN2, beta * margins > gamma)
    # the chosen reward exceeds the rejected one exactly when the margin is positive
    assert torch.equal(out.chosen_rewards > out.rejected_rewards, margins > 0)


@pytest.mark.parametrize(
    ("version", "logit"),
    [
        # v1: (mw - ml) - (kl_l - kl_w) = (0.3 - -0.2) - (0.4 - 0.1) = 0.5 - 0.3 = 0.2
        (1, 0.2),
        # v2: 0.5 - alpha * (kl_l - kl_w) = 0.5 - 0.5 * 0.3 = 0.35
        (2, 0.35),
    ],
)
def test_tdpo_hand_values(version, logit):
    out = tdpo_loss(
        chosen_logps_margin=t(0.3),
        rejected_logps_margin=t(-0.2),
        chosen_seq_kl=t(0.1),
        rejected_seq_kl=t(0.4),
        beta=2.0,
        alpha=0.5,
        version=version,
    )
    # beta * logit: 0.4 (v1) / 0.7 (v2)
    torch.testing.assert_close(out.losses, t(softplus_neg(2.0 * logit)))
    # rewards beta (m + seq_kl): 2 * (0.3 + 0.1) = 0.8, 2 * (-0.2 + 0.4) = 0.4
    torch.testing.assert_close(out.chosen_rewards, t(0.8))
    torch.testing.assert_close(out.rejected_rewards, t(0.4))


def test_tdpo_versions_differ():
    kwargs = dict(
        chosen_logps_margin=t(0.3, 1.0),
        rejected_logps_margin=t(-0.2, 0.5),
        chosen_seq_kl=t(0.1, 0.2),
        rejected_seq_kl=t(0.4, 0.9),
        beta=0.1,
        alpha=0.5,
    )
    v1 = tdpo_loss(**kwargs, version=1).losses
    v2 = tdpo_loss(**kwargs, version=2).losses
    assert torch.all((v1 - v2).abs() > 1e-4)


@pytest.mark.parametrize("version", [0, 3, "2", True, None])
def test_tdpo_rejects_unknown_version(version):
    with pytest.raises(ValueError, match=repr(version).replace("'", ".")):
        tdpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.1, alpha=0.5, version=version)


def test_fpo_hand_values():
    # chosen logratio -1.0 - -1.2 = 0.2, rejected -1.5 - -1.4 = -0.1, DPO margin 0.3
    # constraint alpha (D_l - D_w) = 0.5 * (0.8 - 0.3) = 0.25 -> margin 0.05
    # beta * margin = 2 * 0.05 = 0.1 -> loss log(1 + e^-0.1) = 0.644397
    out = fpo_loss(
        policy_chosen_logps=t(-1.0),
        policy_rejected_logps=t(-1.5),
        ref_chosen_logps=t(-1.2),
        ref_rejected_logps=t(-1.4),
        chosen_feature_mse=t(0.3),
        rejected_feature_mse=t(0.8),
        beta=2.0,
        alpha=0.5,
    )
    torch.testing.assert_close(out.losses, t(0.6443966600735709))
    torch.testing.assert_close(out.chosen_rewards, t(0.4))  # 2 * 0.2
    torch.testing.assert_close(out.rejected_rewards, t(-0.2))  # 2 * -0.1


def test_rewards_are_detached():
    x = t(-1.0, -2.0, grad=True)
    for out in (
        dpo_loss(x, x * 2, x.detach(), x.detach(), beta=0.1),
        simpo_loss(x, x * 2, beta=2.0, gamma=0.5),
        tdpo_loss(x, x * 2, x.abs(), x.abs(), beta=0.1, alpha=0.5, version=1),
        fpo_loss(x, x * 2, x.detach(), x.detach(), x.abs(), x.abs(), beta=0.1, alpha=0.5),
    ):
        assert out.losses.requires_grad
        assert not out.chosen_rewards.requires_grad
        assert not out.rejected_rewards.requires_grad


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(t(0.0, 1.0), t(0.0, 1.0), t(0.0, 1.0), t(0.0), beta=0.1)


# --------------------------------------------------------------------------- stop-gradient


def _constraint_grads(loss_fn, chosen_name, rejected_name, **fixed):
    chosen = t(0.1, 0.3, grad=True)
    rejected = t(0.4, 0.2, grad=True)
    loss_fn(**fixed, **{chosen_name: chosen, rejected_name: rejected}).losses.sum().backward()
    return chosen.grad, rejected.grad


def _tdpo(version):
    def fn(**kw):
        return tdpo_loss(
            chosen_logps_margin=t(0.3, 1.0),
            rejected_logps_margin=t(-0.2, 0.5),
            beta=0.5,
            alpha=0.5,
            version=version,
            **kw,
        )

    return fn


def _fpo(**kw):
    return fpo_loss(
        policy_chosen_logps=t(-1.0, -2.0),
        policy_rejected_logps=t(-1.5, -1.0),
        ref_chosen_logps=t(-1.2, -2.1),
        ref_rejected_logps=t(-1.4, -1.3),
        beta=0.5,
        alpha=0.5,
        **kw,
    )


@pytest.mark.parametrize(
    ("loss_fn", "chosen_name", "rejected_name"),
    [
        (_tdpo(2), "chosen_seq_kl", "rejected_seq_kl"),
        (_fpo, "chosen_feature_mse", "rejected_feature_mse"),
    ],
)
def test_chosen_constraint_is_stop_gradient(loss_fn, chosen_name, rejected_name):
    chosen_grad, rejected_grad = _constraint_grads(loss_fn, chosen_name, rejected_name)
    assert chosen_grad is None or torch.all(chosen_grad == 0)
    assert rejected_grad is not None and torch.all(rejected_grad != 0)


def test_tdpo_v1_has_gradient_through_chosen_kl():
    chosen_grad, rejected_grad = _constraint_grads(_tdpo(1), "chosen_seq_kl", "rejected_seq_kl")
    assert chosen_grad is not None and torch.all(chosen_grad != 0)
    # v1: d loss / d kl_w = -d loss / d kl_l (they enter as kl_l - kl_w)
    torch.testing.assert_close(chosen_grad, -rejected_grad)


# --------------------------------------------------------------------------- gradients


def _random(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(True)


# name -> (losses as a function of the inputs, number of inputs, stop-gradient inputs);
# gradcheck compares against finite differences, so inputs behind sg() are held constant.
GRADCHECK_CASES = {
    "dpo": (lambda a, b, c, d: dpo_loss(a, b, c, d, beta=0.3).losses, 4, ()),
    "simpo": (lambda a, b: simpo_loss(a, b, beta=2.0, gamma=0.5).losses, 2, ()),
    "tdpo1": (
        lambda a, b, c, d: tdpo_loss(a, b, c, d, beta=0.3, alpha=0.5, version=1).losses,
        4,
        (),
    ),
    "tdpo2": (
        lambda a, b, c, d: tdpo_loss(a, b, c, d, beta=0.3, alpha=0.5, version=2).losses,
        4,
        (2,),
    ),
    "fpo": (
        lambda a, b, c, d, e, f: fpo_loss(a, b, c, d, e, f, beta=0.3, alpha=0.5).losses,
        6,
        (4,),
    ),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name):
    fn, n_inputs, stop_gradient = GRADCHECK_CASES[name]
    inputs = tuple(
        _random(5, seed=i).requires_grad_(i not in stop_gradient) for i in range(n_inputs)
    )
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradcheck_feature_mse():
    # distinct, well-separated policy values so the top-k set is stable under perturbation
    policy = torch.randperm(12, generator=torch.Generator().manual_seed(0)).double() * 0.5
    policy = policy.reshape(2, 6).requires_grad_(True)
    idx = torch.tensor([[0, 5], [2, 3]])
    val = torch.tensor([[1.0, 2.0], [0.5, 0.25]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda p: feature_mse(p, idx, val, k=2), (policy,))


def test_every_objective_gives_nonzero_policy_gradients():
    b = 8
    pw, pl = _random(b, seed=1), _random(b, seed=2)
    rw, rl = _random(b, seed=3).detach(), _random(b, seed=4).detach()
    kl_w, kl_l = _random(b, seed=5).abs(), _random(b, seed=6).abs()
    d_w, d_l = _random(b, seed=7).abs(), _random(b, seed=8).abs()
    outs = {
        "dpo": dpo_loss(pw, pl, rw, rl, beta=0.1),
        "simpo": simpo_loss(pw, pl, beta=2.0, gamma=0.5),
        "tdpo1": tdpo_loss(pw - rw, pl - rl, kl_w, kl_l, beta=0.1, alpha=0.5, version=1),
        "tdpo2": tdpo_loss(pw - rw, pl - rl, kl_w, kl_l, beta=0.1, alpha=0.5, version=2),
        "fpo": fpo_loss(pw, pl, rw, rl, d_w, d_l, beta=0.1, alpha=0.5),
    }
    for name, out in outs.items():
        grad_w, grad_l = torch.autograd.grad(out.losses.mean(), (pw, pl))
        assert torch.all(grad_w < 0), name  # raising the chosen log-prob lowers the loss
        assert torch.all(grad_l > 0), name  # raising the rejected log-prob raises it


# --------------------------------------------------------------------------- feature_mse

# d_sae = 6, k = 2: the policy's top-2 features are {1 (3.0), 3 (2.0)}
POLICY = torch.tensor([[0.0, 3.0, 0.5, 2.0, 0.0, 1.0]])


def test_feature_mse_disjoint_index_sets():
    # reference top-k {0: 1.0, 5: 2.0}; I = {0, 1, 3, 5}
    # (0 - 1)^2 + (3 - 0)^2 + (2 - 0)^2 + (1 - 2)^2 = 1 + 9 + 4 + 1 = 15; / k = 7.5
    # (feature 2 = 0.5 is in neither set and does not count)
    d = feature_mse(POLICY, torch.tensor([[0, 5]]), torch.tensor([[1.0, 2.0]]), k=2)
    torch.testing.assert_close(d, torch.tensor([7.5]))


def test_feature_mse_overlapping_index_sets_and_batch():
    # row 0: reference {1: 2.5, 2: 0.5}; I = {1, 2, 3}
    #        (3 - 2.5)^2 + (0.5 - 0.5)^2 + (2 - 0)^2 = 0.25 + 0 + 4 = 4.25; / 2 = 2.125
    # row 1: policy [1, 0, 0, 0, 4, 2] top-2 {4, 5}; reference {4: 4.0, 5: 1.0}; I = {4, 5}
    #        (4 - 4)^2 + (2 - 1)^2 = 1; / 2 = 0.5
    policy = torch.cat([POLICY, torch.tensor([[1.0, 0.0, 0.0, 0.0, 4.0, 2.0]])])
    idx = torch.tensor([[1, 2], [4, 5]], dtype=torch.int16)  # cache dtype
    val = torch.tensor([[2.5, 0.5], [4.0, 1.0]], dtype=torch.float16)
    torch.testing.assert_close(feature_mse(policy, idx, val, k=2), torch.tensor([2.125, 0.5]))


def test_feature_mse_with_k_equal_d_sae_is_dense_mse():
    g = torch.Generator().manual_seed(0)
    policy = torch.rand(4, 16, generator=g)
    ref_full = torch.rand(4, 16, generator=g)
    ref_val, ref_idx = ref_full.topk(5, dim=1)
    ref_dense = torch.zeros_like(ref_full).scatter(1, ref_idx, ref_val)
    expected = (policy - ref_dense).square().mean(dim=1)
    torch.testing.assert_close(feature_mse(policy, ref_idx, ref_val, k=16), expected)


def test_feature_mse_gradient_reaches_policy_only_on_union():
    policy = POLICY.clone().requires_grad_(True)
    feature_mse(policy, torch.tensor([[0, 5]]), torch.tensor([[1.0, 2.0]]), k=2).sum().backward()
    # d/dp (1/k) (p - r)^2 = (p - r) on I = {0, 1, 3, 5}; zero on 2 and 4
    torch.testing.assert_close(policy.grad, torch.tensor([[-1.0, 3.0, 0.0, 2.0, 0.0, -1.0]]))


@pytest.mark.parametrize("k", [0, 7])
def test_feature_mse_rejects_bad_k(k):
    with pytest.raises(ValueError, match=f"got {k}"):
        feature_mse(POLICY, torch.tensor([[0, 5]]), torch.tensor([[1.0, 2.0]]), k=k)


def test_normalized_feature_mse_is_scale_free_and_relative_to_the_reference_energy():
    generator = torch.Generator().manual_seed(3)
    policy = torch.rand(3, 12, generator=generator)
    reference = torch.rand(3, 12, generator=generator)
    top = reference.topk(4, dim=1)
    raw = feature_mse(policy, top.indices, top.values, k=4)
    relative = feature_mse(policy, top.indices, top.values, k=4, normalize=True)
    energy = top.values.square().sum(1) / 4
    torch.testing.assert_close(relative, raw / energy)
    scaled = feature_mse(50 * policy, top.indices, 50 * top.values, k=4, normalize=True)
    torch.testing.assert_close(scaled, relative)
    torch.testing.assert_close(
        feature_mse(50 * policy, top.indices, 50 * top.values, k=4), 2500 * raw
    )
    silent = feature_mse(policy, top.indices, torch.zeros_like(top.values), k=4, normalize=True)
    torch.testing.assert_close(silent, feature_mse(policy, top.indices, 0 * top.values, k=4))
