"""The five preference objectives behind one interface.

`fpo.objectives` holds the pure loss formulas; this module says what each method needs
from a forward pass (reference log-probs, SAE features, full-vocab KL) and turns the
per-row statistics of a batch (chosen rows first, then rejected rows) into its loss.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import Tensor

from fpo import objectives
from fpo.errors import UserError
from fpo.logprobs import SequenceLogps


@dataclass(frozen=True)
class Method:
    """What one objective needs.

    Attributes:
        name: config name (``objective.name``).
        reference: needs reference log-probs (online model or offline cache).
        features: needs pooled SAE features of policy and reference (FPO).
        token_kl: needs the reference's full-vocabulary logits online (TDPO).
        length_normalised: uses average instead of summed response log-probs.
        hyperparameters: the ``objective.*`` keys it reads.
    """

    name: str
    reference: bool
    features: bool
    token_kl: bool
    length_normalised: bool
    hyperparameters: tuple[str, ...]


METHODS: dict[str, Method] = {
    "dpo": Method("dpo", True, False, False, False, ("beta",)),
    "simpo": Method("simpo", False, False, False, True, ("beta", "gamma")),
    "tdpo1": Method("tdpo1", True, False, True, False, ("beta", "alpha")),
    "tdpo2": Method("tdpo2", True, False, True, False, ("beta", "alpha")),
    "fpo": Method("fpo", True, True, False, True, ("beta", "alpha", "k")),
}


def get_method(objective: Mapping) -> Method:
    """Look up ``objective.name`` and check its hyperparameters are present."""
    name = objective.get("name")
    if name not in METHODS:
        raise UserError(
            f"objective.name={name!r} is not a known objective; choose one of "
            f"{', '.join(METHODS)} (e.g. `fpo-train objective=fpo`)."
        )
    method = METHODS[name]
    missing = [key for key in method.hyperparameters if objective.get(key) is None]
    if missing:
        raise UserError(f"objective={name} needs objective.{', objective.'.join(missing)}.")
    return method


def halves(x: Tensor) -> tuple[Tensor, Tensor]:
    """Split a ``[2B, ...]`` tensor into its chosen ``[B, ...]`` and rejected halves."""
    b = x.shape[0] // 2
    return x[:b], x[b:]


def compute_loss(
    method: Method,
    objective: Mapping,
    policy: SequenceLogps,
    reference: SequenceLogps | None = None,
    seq_kl: Tensor | None = None,
    feature_mse: Tensor | None = None,
) -> objectives.PreferenceLoss:
    """The per-pair loss of ``method`` from per-row statistics (all ``[2B]``)."""
    field = "avg" if method.length_normalised else "sum"
    pw, pl = halves(getattr(policy, field))
    if method.name == "simpo":
        return objectives.simpo_loss(pw, pl, beta=objective["beta"], gamma=objective["gamma"])
    rw, rl = halves(getattr(reference, field))
    if method.name == "dpo":
        return objectives.dpo_loss(pw, pl, rw, rl, beta=objective["beta"])
    if method.token_kl:
        kw, kl = halves(seq_kl)
        return objectives.tdpo_loss(
            pw - rw,
            pl - rl,
            kw,
            kl,
            beta=objective["beta"],
            alpha=objective["alpha"],
            version=int(method.name[-1]),
        )
    dw, dl = halves(feature_mse)
    return objectives.fpo_loss(
        pw, pl, rw, rl, dw, dl, beta=objective["beta"], alpha=objective["alpha"]
    )
