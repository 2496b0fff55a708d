"""Objectives as a margin plus optional constraint terms, from config (formulas: `fpo.losses`).

An objective is ``-logsig(beta * [margin - constraints] - gamma)`` (the pure formula is
:func:`fpo.losses.preference_loss`). Its parts, each declaring what it needs:

============  ==========================================================  ==================
part          per-pair value (w = chosen, l = rejected)                   needs
============  ==========================================================  ==================
``dpo``       margin ``(sum_pw - sum_rw) - (sum_pl - sum_rl)``            reference log-probs
``ln_dpo``    margin ``(avg_pw - avg_rw) - (avg_pl - avg_rl)`` (FPO's)    reference log-probs
``simpo``     margin ``avg_pw - avg_pl``, ``gamma = beta*gamma_beta_ratio``   nothing
token_kl      ``alpha * (KL_l - sg(KL_w))``, sequential full-vocab KL     reference logits
features      ``alpha * (D_l - sg(D_w))``, SAE feature MSE over top-k     SAE features
============  ==========================================================  ==================

``sg`` applies only with ``stop_gradient: true``; a constraint is on when its ``alpha`` is not
0 (only then is what it needs required). The presets in ``configs/objective`` are:

* ``dpo``   = margin dpo
* ``simpo`` = margin simpo, beta 2, gamma_beta_ratio 0.5 (the FPO paper's SimPO baseline)
* ``tdpo1`` = margin dpo + token_kl(alpha 1, stop_gradient false)
* ``tdpo2`` = margin dpo + token_kl(alpha 0.5, stop_gradient true)
* ``fpo``   = margin ln_dpo + features(alpha = the SAE config's ``feature_alpha``, k 50,
  stop_gradient true)

and new combinations come from config alone, e.g.
``objective=simpo objective.constraints.features.alpha=0.5`` (SimPO + FPO's feature term) or
``objective=fpo objective.margin=dpo objective.constraints.token_kl.alpha=0.5``.

The dataclasses are Hydra structured configs (registered as ``objective_schema``, the base of
every preset), so a typo in an objective key fails when the config is composed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fpo.errors import UserError

if TYPE_CHECKING:  # no torch at import: the schema is registered when a config is composed
    from torch import Tensor

    from fpo import losses
    from fpo.logprobs import SequenceLogps


class Margin(StrEnum):
    """Which log-probs the margin compares (see the module docstring)."""

    dpo = "dpo"
    ln_dpo = "ln_dpo"
    simpo = "simpo"


@dataclass(frozen=True)
class Needs:
    """What a forward pass must provide for an objective.

    reference_logps: the reference's summed/averaged response log-probs (online or cached).
    reference_logits: the reference's full-vocabulary logits at every step (online only).
    features: pooled SAE features of policy and reference (an SAE, and the reference's top-k).
    """

    reference_logps: bool = False
    reference_logits: bool = False
    features: bool = False

    @property
    def reference(self) -> bool:
        return self.reference_logps or self.reference_logits or self.features

    def __or__(self, other: Needs) -> Needs:
        return Needs(
            self.reference_logps or other.reference_logps,
            self.reference_logits or other.reference_logits,
            self.features or other.features,
        )


@dataclass
class TokenKL:
    """TDPO's constraint: ``alpha * (KL_l - sg(KL_w))`` with the sequential KL
    ``sum_t KL(pi_ref(.|ctx_t) || pi_theta(.|ctx_t))``; added to the rewards, as in TDPO."""

    alpha: float = 0.0
    stop_gradient: bool = True

    needs: ClassVar[Needs] = Needs(reference_logps=True, reference_logits=True)
    stat: ClassVar[str] = "kl"
    in_rewards: ClassVar[bool] = True

    def validate(self, *, sae: Any, cached_reference: bool) -> None:
        if cached_reference:
            raise UserError(
                "objective.constraints.token_kl (TDPO) needs the reference's full-vocabulary "
                "logits at every step, which the offline cache does not store; use "
                "reference=online (and no fpo-cache) for this objective."
            )


@dataclass
class Features:
    """FPO's constraint: ``alpha * (D_l - sg(D_w))``, ``D`` the feature MSE of pooled SAE
    features over ``topk(policy, k) UNION reference top-k`` divided by ``k``; with
    ``normalize`` divided by the reference's pooled feature energy over the same set, so
    ``D`` is scale-free and one ``alpha`` transfers between SAEs (not in the paper)."""

    alpha: float = 0.0
    k: int = 50
    stop_gradient: bool = True
    normalize: bool = False

    needs: ClassVar[Needs] = Needs(features=True)
    stat: ClassVar[str] = "fmse"
    in_rewards: ClassVar[bool] = False

    def validate(self, *, sae: Any, cached_reference: bool) -> None:
        if sae is None:
            raise UserError(
                "objective.constraints.features needs an SAE: choose one with sae=... "
                "(e.g. sae=random for smoke runs)."
            )
        d_sae = int(sae.cfg.d_sae)
        if not 1 <= self.k <= d_sae:
            raise UserError(
                f"objective.constraints.features.k={self.k} must be between 1 and the SAE's "
                f"d_sae={d_sae}."
            )


@dataclass
class Constraints:
    """Both terms are always configured; a term with ``alpha == 0`` is off."""

    token_kl: TokenKL = field(default_factory=TokenKL)
    features: Features = field(default_factory=Features)

    def active(self) -> list[TokenKL | Features]:
        return [term for term in (self.token_kl, self.features) if term.alpha != 0]


@dataclass
class Objective:
    """A preference objective: a margin, ``beta``, SimPO's ``gamma_beta_ratio`` and
    optional constraints. ``name`` labels runs and metrics; it does not change the loss."""

    name: str = "custom"
    margin: Margin = Margin.dpo
    beta: float = 0.1
    # SimPO target margin in the SimPO repository's convention beta * (margin - ratio):
    # gamma in reward units (TRL's simpo_gamma) = beta * gamma_beta_ratio.
    gamma_beta_ratio: float = 0.0
    constraints: Constraints = field(default_factory=Constraints)

    @property
    def needs(self) -> Needs:
        needs = Needs(reference_logps=self.margin is not Margin.simpo)
        for term in self.constraints.active():
            needs = needs | term.needs
        return needs

    @property
    def length_normalised(self) -> bool:
        """The margin uses per-token averages (``avg``) instead of sums."""
        return self.margin is not Margin.dpo

    @property
    def logps_field(self) -> str:
        """``"avg"`` or ``"sum"``: the field of :class:`SequenceLogps` the margin uses."""
        return "avg" if self.length_normalised else "sum"

    @property
    def feature_k(self) -> int:
        """Top-k features per row the reference must provide (0 without the feature term)."""
        return self.constraints.features.k if self.constraints.features.alpha != 0 else 0

    def validate(self, *, sae: Any, cached_reference: bool) -> None:
        """Raise :class:`UserError` when the run cannot provide what a term needs."""
        if self.margin is not Margin.simpo and self.gamma_beta_ratio:
            raise UserError(
                f"objective.gamma_beta_ratio={self.gamma_beta_ratio} is used only by "
                f"margin=simpo (objective {self.name} has margin={self.margin.value})."
            )
        for term in self.constraints.active():
            term.validate(sae=sae, cached_reference=cached_reference)

    def loss(
        self,
        policy: SequenceLogps,
        reference: SequenceLogps | None,
        stats: Mapping[str, Tensor],
    ) -> losses.PreferenceLoss:
        """Per-pair losses from per-row statistics, rows chosen-then-rejected.

        Args:
            policy: the policy's response log-probs, each field ``[2B]``.
            reference: the reference's (``None`` for margin simpo).
            stats: ``[2B]`` values of the constraint terms by their ``stat`` name
                (``kl``: sequential KL, ``fmse``: feature discrepancy D).
        """
        from fpo import losses

        field_name = self.logps_field
        pw, pl = getattr(policy, field_name).chunk(2)
        gamma = 0.0
        if self.margin is Margin.simpo:
            gamma = self.beta * self.gamma_beta_ratio
        else:
            rw, rl = getattr(reference, field_name).chunk(2)
            pw, pl = pw - rw, pl - rl
        penalties = [
            losses.Penalty(
                *stats[term.stat].chunk(2), term.alpha, term.stop_gradient, term.in_rewards
            )
            for term in self.constraints.active()
        ]
        return losses.preference_loss(pw, pl, self.beta, gamma=gamma, penalties=penalties)


#: The schema's name in Hydra's ConfigStore: each configs/objective/<preset>.yaml starts with
#: ``defaults: [/objective_schema, _self_]``. Outside the ``objective`` group, so it is not
#: offered as an objective (``--help``) nor selectable (``objective=objective_schema``).
SCHEMA_NAME = "objective_schema"
ConfigStore.instance().store(name=SCHEMA_NAME, node=Objective)


def build_objective(config: Mapping | Objective) -> Objective:
    """An :class:`Objective` from a (Hydra or plain) mapping, checked against the schema.

    Raises :class:`UserError` naming the bad key (with the valid ones) or value.
    """
    if isinstance(config, Objective):
        return config
    try:
        if isinstance(config, DictConfig):
            # A node of a composed config reads keys outside it (FPO's alpha is the SAE's
            # ``${sae.feature_alpha}``): resolve it in that config, before copying it out.
            config = OmegaConf.to_container(config, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(Objective), config)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise UserError(
            f"objective: {error.msg if hasattr(error, 'msg') else error} "
            "(keys: name, margin (dpo|ln_dpo|simpo), beta, gamma_beta_ratio, "
            "constraints.token_kl.{alpha,stop_gradient}, "
            "constraints.features.{alpha,k,stop_gradient,normalize})."
        ) from None
