"""Pure preference-optimisation losses: DPO, SimPO, TDPO-1/2 and FPO.

No model and no Lightning here: every function takes per-pair tensors of shape ``[B]``
(w = chosen, l = rejected) and returns a :class:`PreferenceLoss` of per-pair losses and
detached implicit rewards. All losses are one form, the logistic loss on a scaled margin
minus optional constraint penalties (:func:`preference_loss`)::

    loss = -log sigmoid(beta * [margin - sum_j alpha_j * (P_l - sg(P_w))] - gamma)

The four named losses below are the published objectives as instances of it (their
keyword names are a stable interface); ``fpo.objective`` composes new ones from config.
``sg`` below is stop-gradient (``Tensor.detach``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Penalty",
    "PreferenceLoss",
    "dpo_loss",
    "feature_mse",
    "fpo_loss",
    "preference_loss",
    "simpo_loss",
    "tdpo_loss",
]


class PreferenceLoss(NamedTuple):
    """Per-pair output of every objective; all fields have shape ``[B]``.

    ``losses`` carries the gradient; the rewards are detached (for logging and accuracy).
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor


def _check_same_shape(**tensors: Tensor) -> None:
    """Raise ``ValueError`` naming the arguments when the per-pair tensors differ in shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"per-pair tensors must all have the same shape [B]; got {listed}")


class Penalty(NamedTuple):
    """A constraint term inside the logistic margin, per pair (``[B]`` tensors).

    ``alpha * (rejected - sg(chosen))`` is subtracted from the margin (``sg`` only with
    ``stop_gradient``); with ``in_rewards`` the chosen/rejected values are also added to the
    implicit rewards (TDPO's sequential KL), otherwise the rewards ignore the term (FPO).
    """

    chosen: Tensor
    rejected: Tensor
    alpha: float
    stop_gradient: bool
    in_rewards: bool


def preference_loss(
    chosen_margin: Tensor,
    rejected_margin: Tensor,
    beta: float,
    gamma: float = 0.0,
    penalties: Sequence[Penalty] = (),
) -> PreferenceLoss:
    """The one formula every objective is an instance of; all tensors ``[B]``.

    With ``c_w, c_l`` the chosen/rejected margin terms (a log-ratio to the reference, or the
    policy's own log-prob for SimPO) and penalties ``P^j``::

        loss    = -logsig(beta * [(c_w - c_l) - sum_j alpha_j * (P^j_l - sg?(P^j_w))] - gamma)
        rewards = beta * (c_w + sum_{j in rewards} P^j_w),  beta * (c_l + sum_{j in rewards} P^j_l)

    ``F.logsigmoid`` keeps it stable for any margin; the rewards are detached.
    """
    _check_same_shape(chosen_margin=chosen_margin, rejected_margin=rejected_margin)
    margin = chosen_margin - rejected_margin
    chosen_reward, rejected_reward = chosen_margin, rejected_margin
    for penalty in penalties:
        _check_same_shape(
            chosen_margin=chosen_margin,
            penalty_chosen=penalty.chosen,
            penalty_rejected=penalty.rejected,
        )
        chosen = penalty.chosen.detach() if penalty.stop_gradient else penalty.chosen
        margin = margin - penalty.alpha * (penalty.rejected - chosen)
        if penalty.in_rewards:
            chosen_reward = chosen_reward + penalty.chosen
            rejected_reward = rejected_reward + penalty.rejected
    losses = -F.logsigmoid(beta * margin - gamma)
    return PreferenceLoss(
        losses, (beta * chosen_reward).detach(), (beta * rejected_reward).detach()
    )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> PreferenceLoss:
    """DPO (Rafailov et al. 2023) on summed response log-probs.

    With ``pw, pl`` the policy's and ``rw, rl`` the reference's ``sum_lp`` (all ``[B]``)::

        loss    = -logsig(beta * [(pw - rw) - (pl - rl)])
        rewards = beta * (pw - rw),  beta * (pl - rl)
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    return preference_loss(
        policy_chosen_logps - ref_chosen_logps, policy_rejected_logps - ref_rejected_logps, beta
    )


def simpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    beta: float,
    gamma: float,
) -> PreferenceLoss:
    """SimPO (Meng et al. 2024): reference-free, on length-averaged log-probs.

    With ``pw, pl`` the policy's ``avg_lp`` (``[B]``) and ``gamma`` the target margin in
    reward units. Conventions: TRL's ``CPOConfig(loss_type="simpo", simpo_gamma=g)`` is
    ``gamma = g``; the SimPO repository's (and the FPO paper code's) ``beta * (margin -
    gamma_beta_ratio)`` is ``gamma = beta * gamma_beta_ratio`` (the config speaks that one)::

        loss    = -logsig(beta * (pw - pl) - gamma)
        rewards = beta * pw,  beta * pl
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps
    )
    return preference_loss(policy_chosen_logps, policy_rejected_logps, beta, gamma=gamma)


def tdpo_loss(
    chosen_logps_margin: Tensor,
    rejected_logps_margin: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    beta: float,
    alpha: float,
    version: int,
) -> PreferenceLoss:
    """TDPO (Zeng et al. 2024), token-level DPO with a sequential KL term.

    ``mw, ml = sum_lp_policy - sum_lp_ref`` per response and ``kl_w, kl_l`` the sequential
    KL ``sum_t KL(pi_ref(.|ctx_t) || pi_theta(.|ctx_t))`` over response positions (all ``[B]``)::

        version 1: loss = -logsig(beta * [(mw - ml) - (kl_l - kl_w)])          (alpha unused)
        version 2: loss = -logsig(beta * [(mw - ml) - alpha * (kl_l - sg(kl_w))])
        rewards   = beta * (mw + kl_w),  beta * (ml + kl_l)

    Raises ``ValueError`` for a ``version`` other than 1 or 2 (the TDPO repo's config
    silently runs version 1; we make the choice explicit).
    """
    if isinstance(version, bool) or version not in (1, 2):
        raise ValueError(f"tdpo_loss: version must be 1 or 2, got {version!r}")
    _check_same_shape(
        chosen_logps_margin=chosen_logps_margin,
        rejected_logps_margin=rejected_logps_margin,
        chosen_seq_kl=chosen_seq_kl,
        rejected_seq_kl=rejected_seq_kl,
    )
    kl = Penalty(
        chosen_seq_kl,
        rejected_seq_kl,
        alpha=1.0 if version == 1 else alpha,
        stop_gradient=version == 2,
        in_rewards=True,
    )
    return preference_loss(chosen_logps_margin, rejected_logps_margin, beta, penalties=[kl])


def fpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_feature_mse: Tensor,
    rejected_feature_mse: Tensor,
    beta: float,
    alpha: float,
) -> PreferenceLoss:
    """FPO (arXiv 2411.07618): length-normalised DPO margin with a feature-level constraint.

    With ``pw, pl`` / ``rw, rl`` the policy's / reference's ``avg_lp`` and ``D_w, D_l`` the
    sparse feature discrepancies from :func:`feature_mse` (all ``[B]``)::

        loss    = -logsig(beta * [(pw - rw) - (pl - rl) - alpha * (D_l - sg(D_w))])
        rewards = beta * (pw - rw),  beta * (pl - rl)
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
        chosen_feature_mse=chosen_feature_mse,
        rejected_feature_mse=rejected_feature_mse,
    )
    features = Penalty(
        chosen_feature_mse, rejected_feature_mse, alpha, stop_gradient=True, in_rewards=False
    )
    return preference_loss(
        policy_chosen_logps - ref_chosen_logps,
        policy_rejected_logps - ref_rejected_logps,
        beta,
        penalties=[features],
    )


def feature_mse(
    policy_features: Tensor,
    ref_topk_indices: Tensor,
    ref_topk_values: Tensor,
    k: int,
    normalize: bool = False,
) -> Tensor:
    """Sparse feature discrepancy ``D`` between policy and reference pooled SAE features.

    Args:
        policy_features: ``[B, d_sae]`` the policy's pooled SAE activations ``cbar_theta``.
        ref_topk_indices: ``[B, k_ref]`` integer indices of the reference's top-k features
            (any integer dtype; int16/int32 from the cache are fine).
        ref_topk_values: ``[B, k_ref]`` the reference's values at those indices.
        k: how many of the policy's largest features to take, ``1 <= k <= d_sae``.
        normalize: divide by the reference's pooled feature energy over the same union,
            ``E = (1/k) * sum_{i in I} cbar_ref[i]^2`` (= over ``idx_ref``), so that ``D`` is
            relative (scale-free: the same for an SAE whose features are all scaled by c)
            and one ``alpha`` transfers between SAEs. ``E`` is a constant of the reference.

    Returns:
        ``[B]``: ``D = (1/k) * sum_{i in I} (cbar_theta[i] - cbar_ref[i])^2`` with
        ``I = topk(cbar_theta, k) UNION idx_ref`` and ``cbar_ref`` zero outside ``idx_ref``
        (``D / E`` with ``normalize``; a row whose reference energy is 0 keeps ``D``).
        With ``k = d_sae`` this is the dense mean squared error over all features.

    Vectorised: the reference top-k is scattered into a dense ``[B, d_sae]`` zero tensor and
    the squared difference is masked to the union of index sets.
    """
    if policy_features.dim() != 2:
        raise ValueError(
            f"feature_mse: policy_features must be [B, d_sae], got {tuple(policy_features.shape)}"
        )
    if ref_topk_indices.shape != ref_topk_values.shape or (
        ref_topk_indices.shape[0] != policy_features.shape[0]
    ):
        raise ValueError(
            "feature_mse: ref_topk_indices and ref_topk_values must both be [B, k_ref] with the "
            f"batch size of policy_features; got {tuple(ref_topk_indices.shape)}, "
            f"{tuple(ref_topk_values.shape)} and {tuple(policy_features.shape)}"
        )
    d_sae = policy_features.shape[1]
    if not 1 <= k <= d_sae:
        raise ValueError(f"feature_mse: k must be in [1, d_sae={d_sae}], got {k}")

    ref_indices = ref_topk_indices.long()
    ref_dense = torch.zeros_like(policy_features).scatter(
        1, ref_indices, ref_topk_values.to(policy_features.dtype)
    )
    policy_topk = policy_features.detach().topk(k, dim=1).indices
    in_union = torch.zeros_like(policy_features, dtype=torch.bool)
    in_union.scatter_(1, policy_topk, True).scatter_(1, ref_indices, True)
    squared = (policy_features - ref_dense).square()
    discrepancy = torch.where(in_union, squared, torch.zeros_like(squared)).sum(dim=1) / k
    if not normalize:
        return discrepancy
    energy = ref_dense.square().sum(dim=1) / k
    return discrepancy / torch.where(energy > 0, energy, torch.ones_like(energy))
