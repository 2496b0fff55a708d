"""Every numeric setting checked before anything loads.

:func:`check_settings` runs first thing in :func:`fpo.builder.build_run_parts` (so in
``fpo-train``, ``fpo-cache`` and ``fpo-eval``): each key of :data:`RULES` present in the
composed config must hold an allowed value (sign, range, finite, an integer where counts
are meant). Otherwise one :class:`~fpo.errors.UserError` names every offending key with its
value and what it allows, e.g. ``optimizer.lr=-1e-05: must be a finite number > 0``, before
a model, an SAE or data is loaded. Booleans and strings are not numbers here (``true`` is
not 1), and a float is not an integer (``data.batch_size=2.0`` is refused).

The table covers the objective, optimizer, scheduler, step, data, cache and evaluation
settings and the trainer keys users set; a key absent from the config (``optimizer.eps``
unless given) is not checked. A trainer strategy's own arguments (``trainer.strategy.*``)
are left to the strategy. ``tests/reliability/test_settings_check.py`` fails when a
composed config holds a numeric key that has no rule here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fpo.errors import UserError


@dataclass(frozen=True)
class Rule:
    """What a setting allows: ``accepts(value)`` and its wording ``allowed``."""

    accepts: Callable[[Any], bool]
    allowed: str

    def __or__(self, other: Rule) -> Rule:
        either = f"{self.allowed} or {other.allowed}"
        return Rule(lambda value: self.accepts(value) or other.accepts(value), either)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        if low == high:
            return f"= {_num(low)}"
        return f"in {'(' if low_open else '['}{_num(low)}, {_num(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {_num(low)}"
    return f"{'<' if high_open else '<='} {_num(high)}" if high is not None else ""


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
) -> Rule:
    """An integer (``integer``) or a finite number, within ``[low, high]`` (an end is left out
    when ``None``, excluded when ``*_open``)."""

    def accepts(value: Any) -> bool:
        if not _is_number(value) or (integer and not isinstance(value, int)):
            return False
        if not math.isfinite(value):
            return False
        above = low is None or (value > low if low_open else value >= low)
        below = high is None or (value < high if high_open else value <= high)
        return above and below

    kind = "an integer" if integer else "a finite number"
    return Rule(accepts, f"{kind} {_bounds(low, high, low_open, high_open)}".strip())


def pair_of(rule: Rule) -> Rule:
    """A list of two values, each allowed by ``rule`` (AdamW's ``betas``)."""

    def accepts(value: Any) -> bool:
        return (
            isinstance(value, list | tuple | ListConfig)
            and len(value) == 2
            and all(rule.accepts(item) for item in value)
        )

    each = rule.allowed.removeprefix("a finite number ")
    return Rule(accepts, f"a list of two numbers, each {each}")


NULL = Rule(lambda value: value is None, "null")
POSITIVE = number(0, low_open=True)
NON_NEGATIVE = number(0)
COUNT = number(1, integer=True)
NON_NEGATIVE_INT = number(0, integer=True)
SEED = number(0, 2**32 - 1, integer=True)  # numpy's range; Lightning refuses others
#: Lightning's devices: a count, -1 (all), "auto", or device ids (a list or "0,1").
DEVICES = COUNT | number(-1, -1, integer=True)
_DEVICE_TEXT = re.compile(r"auto|-1|\d+(,\d+)*,?")
DEVICES |= Rule(
    lambda v: isinstance(v, str) and bool(_DEVICE_TEXT.fullmatch(v.replace(" ", ""))), "'auto'"
)
DEVICES |= Rule(
    lambda v: isinstance(v, list | ListConfig) and all(NON_NEGATIVE_INT.accepts(i) for i in v),
    "a list of device ids",
)
#: Lightning's limit_*_batches: a number of batches, or a fraction of them.
BATCHES = NON_NEGATIVE_INT | number(0, 1) | NULL

#: Config key -> what it allows. A new numeric key needs a line here (the tests check it).
RULES: dict[str, Rule] = {
    "seed": SEED,
    "objective.beta": POSITIVE,
    "objective.gamma_beta_ratio": NON_NEGATIVE,
    "objective.constraints.token_kl.alpha": NON_NEGATIVE,
    "objective.constraints.features.alpha": NON_NEGATIVE,
    "objective.constraints.features.k": COUNT,
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.betas": pair_of(number(0, 1, high_open=True)),
    "optimizer.eps": POSITIVE,
    "scheduler.num_warmup_steps": NON_NEGATIVE_INT,
    "scheduler.num_training_steps": COUNT,
    "model.lora.r": COUNT,
    "model.lora.alpha": POSITIVE,
    "model.lora.dropout": number(0, 1, high_open=True),
    "step.global_batch_size": COUNT | NULL,
    "step.logits_chunk_size": COUNT | NULL,
    "data.batch_size": COUNT,
    "data.eval_batch_size": COUNT | NULL,
    "data.max_length": number(2, integer=True),
    "data.max_prompt_length": COUNT,
    "data.num_workers": NON_NEGATIVE_INT,
    "data.num_proc": NON_NEGATIVE_INT | NULL,
    "data.max_train_samples": COUNT | NULL,
    "data.max_val_samples": COUNT | NULL,
    "data.seed": SEED,
    "cache.shard_size": COUNT,
    "cache.batch_size": COUNT | NULL,
    "trainer.max_epochs": number(-1, integer=True) | NULL,  # -1: no limit
    "trainer.min_epochs": NON_NEGATIVE_INT | NULL,
    "trainer.max_steps": number(-1, integer=True),  # -1: no limit
    "trainer.min_steps": NON_NEGATIVE_INT | NULL,
    "trainer.accumulate_grad_batches": COUNT,
    "trainer.gradient_clip_val": NON_NEGATIVE | NULL,
    "trainer.val_check_interval": COUNT | number(0, 1, low_open=True) | NULL,
    "trainer.limit_train_batches": BATCHES,
    "trainer.limit_val_batches": BATCHES,
    "trainer.limit_test_batches": BATCHES,
    "trainer.limit_predict_batches": BATCHES,
    "trainer.log_every_n_steps": COUNT | NULL,
    "trainer.check_val_every_n_epoch": COUNT | NULL,
    "trainer.num_sanity_val_steps": number(-1, integer=True) | NULL,  # -1: all
    "trainer.num_nodes": COUNT,
    "trainer.devices": DEVICES,
    "evaluation.num_prompts": COUNT | NULL,  # null: every prompt of the file
    "evaluation.num_samples": COUNT,
    "evaluation.max_new_tokens": COUNT,
    "evaluation.batch_size": COUNT,
    "evaluation.num_pairs": COUNT | NULL,
    "evaluation.pairs_batch_size": COUNT,
    "evaluation.feature_report_top": NON_NEGATIVE_INT,
    "evaluation.feature_contexts": NON_NEGATIVE_INT,
    "evaluation.logits_chunk_size": COUNT | NULL,
    "evaluation.seed": SEED,
    "evaluation.validation.num_prompts": COUNT | NULL,
    "evaluation.ood_test.num_prompts": COUNT | NULL,
}

_ABSENT = object()


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at ``key``, or ``_ABSENT`` when the key is not there (or cannot be
    resolved: the code that reads it reports that)."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException:
        return _ABSENT
    return list(value) if isinstance(value, ListConfig) else value


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    return repr(value) if isinstance(value, str) else str(value)


def settings_problems(cfg: DictConfig) -> list[str]:
    """One line ``key=value: must be <allowed>`` per setting of ``cfg`` that :data:`RULES`
    refuses, in table order (empty when every setting is allowed)."""
    problems = []
    for key, rule in RULES.items():
        value = _value(cfg, key)
        if value is not _ABSENT and not rule.accepts(value):
            problems.append(f"{key}={_shown(value)}: must be {rule.allowed}")
    return problems


def check_settings(cfg: DictConfig) -> None:
    """Raise a :class:`UserError` naming every numeric setting of ``cfg`` out of its range
    (see the module docstring); call it before loading anything."""
    if problems := settings_problems(cfg):
        raise UserError(
            f"{'; '.join(problems)}. Nothing was loaded or trained; change "
            f"{'this setting' if len(problems) == 1 else 'these settings'} (on the command "
            "line or in the config)."
        )
