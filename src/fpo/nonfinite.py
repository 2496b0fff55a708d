"""What a training run does with a non-finite loss or gradient (config key ``step.nonfinite``).

``stop`` (default): raise :class:`NonFiniteError` (a :class:`~fpo.errors.UserError`: one
paragraph, exit status 2) naming the optimizer step and the example ids of the batches
that made it, before the bad values reach the weights. Checkpoints are written only after
good steps, so ``last.ckpt`` is the last good state.

``skip``: drop the whole optimizer step's update (every gradient set to ``None``, so AdamW
leaves weights and moments as they were), count it, log the running count as
``train/skipped_nonfinite``, and go on. The learning-rate schedule still advances. Under DDP
the decision is reduced over ranks (one rank's bad batch skips the step everywhere).
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from torch import Tensor

from fpo.errors import UserError

log = logging.getLogger("fpo.nonfinite")
MODES = ("stop", "skip")


class NonFiniteError(UserError):
    """A non-finite loss or gradient with ``step.nonfinite=stop``."""


def _where(module: L.LightningModule) -> str:
    return (
        f"optimizer step {module.global_step + 1} (epoch {module.current_epoch}, "
        f"global step {module.global_step} done)"
    )


def _not_the_rows(module: L.LightningModule) -> str | None:
    """The cause when it is no row: a non-finite objective setting (a module built without
    :func:`fpo.settings_check.check_settings`) or a non-finite weight (an earlier update
    diverged, e.g. from a huge learning rate). Every later step then fails the same way, so
    the message must not point at the rows or at ``skip``. Runs only on the error path."""
    objective = getattr(module, "objective", None)
    numbers = {}
    if objective is not None:
        numbers = {"beta": objective.beta, "gamma_beta_ratio": objective.gamma_beta_ratio}
        for term in ("token_kl", "features"):
            numbers[f"constraints.{term}.alpha"] = getattr(objective.constraints, term).alpha
    if bad := [f"objective.{key}={v}" for key, v in numbers.items() if not math.isfinite(v)]:
        return (
            f"Not finite: {', '.join(bad)}. Every step fails the same way, whatever the rows "
            "(step.nonfinite=skip would skip them all): fix the setting."
        )
    if weight := next((n for n, p in module.named_parameters() if not p.isfinite().all()), None):
        return (
            f"The weight {weight} is no longer finite: an earlier update diverged, so every later "
            "step fails too, whatever the rows (step.nonfinite=skip would skip them all). Lower "
            "optimizer.lr or set trainer.gradient_clip_val, and start again from an earlier "
            "checkpoint."
        )
    return None


class NonFiniteGuard:
    """The per-run state of the check: ids of the current optimizer step, bad ids, count."""

    def __init__(self, mode: str = "stop") -> None:
        if mode not in MODES:
            raise UserError(f"step.nonfinite={mode!r}: choose stop or skip.")
        self.mode = mode
        self.skipped = 0
        self._ids: list[str] = []
        self._bad_ids: list[str] = []

    def seen(self, ids: list[str]) -> None:
        """Record the example ids of a training micro-batch of the current step."""
        self._ids.extend(ids)

    def bad_loss(self, module: L.LightningModule, split: str, loss: Tensor, ids: list) -> None:
        """A non-finite ``split`` loss: raise (stop) or mark the step to skip."""
        if self.mode == "stop":
            raise NonFiniteError(
                f"the {split} loss is {loss.item()} at {_where(module)} for examples {ids}. "
                "Nothing of this step was applied; last.ckpt holds the last good step. "
                + (
                    _not_the_rows(module)
                    or "Lower the learning rate, check these rows, or set step.nonfinite=skip "
                    "to drop such steps."
                )
            )
        log.warning("non-finite %s loss %s for examples %s: skipped", split, loss.item(), ids)
        if split == "train":
            self._bad_ids.extend(ids)

    def before_optimizer_step(self, module: L.LightningModule) -> None:
        """After backward (accumulated, all-reduced): stop, or skip this step's update."""
        params = [p for p in module.parameters() if p.grad is not None]
        grads_ok = True
        if params:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            grads_ok = bool(torch.isfinite(norm))
        bad = bool(self._bad_ids) or not grads_ok
        if module._trainer is not None:
            bad = module.trainer.strategy.reduce_boolean_decision(bad, all=False)
        ids, self._ids, self._bad_ids = self._ids, [], []
        if bad:
            if self.mode == "stop":
                raise NonFiniteError(
                    f"non-finite gradient at {_where(module)}, from examples {ids}. The update "
                    "was not applied; last.ckpt holds the last good step. "
                    + (
                        _not_the_rows(module)
                        or "Lower the learning rate, set trainer.gradient_clip_val, check these "
                        "rows, or set step.nonfinite=skip to drop such steps."
                    )
                )
            for p in params:
                p.grad = None
            self.skipped += 1
            log.warning(
                "skipped %s: non-finite loss or gradient (examples %s); %d skipped so far",
                _where(module),
                ids,
                self.skipped,
            )
        if module._trainer is not None:
            module.log("train/skipped_nonfinite", float(self.skipped), on_step=True)
