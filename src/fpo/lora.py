"""LoRA adapters on the policy (peft), with the reference for free (``model.lora``).

With ``model.lora.enabled=true`` the builder wraps the loaded model in peft's LoRA
(:func:`add_adapters`): the base weights are frozen and only the adapters train. LoRA's
``B`` matrices start at zero, so the policy with its adapters *disabled* is exactly the
initial model, i.e. the reference. The online reference (DPO, TDPO, FPO) is therefore the
policy itself run under ``disable_adapter()`` (:class:`AdapterFreeReference`): no second copy
of the weights. Its values are those of the plain base model bit for bit (a disabled LoRA
layer calls only its base layer), so the offline cache's fingerprint is the base model's
(:func:`base_state_dict`): a cache built for full fine-tuning of the same model serves a
LoRA run, and the other way round.

The saved policy (``<run>/policy/``) holds the adapters (``adapter_config.json``,
``adapter_model.safetensors``), or with ``model.lora.merge=true`` the merged full weights
(an ordinary Hugging Face folder); checkpoints hold the whole policy, adapters included.
peft is imported only when a run uses LoRA.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpo.errors import UserError
from fpo.reference.base import OnlineReference, ReferenceStats

log = logging.getLogger("fpo.lora")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class LoraSettings:
    """``model.lora``: LoRA rank ``r``, scale ``alpha`` (the update is ``alpha / r * B A``),
    ``dropout`` on the adapters' input, ``target_modules`` (module names, or peft's
    ``all-linear``: every linear layer but the LM head) and ``merge`` (save the merged full
    weights instead of the adapters)."""

    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | tuple[str, ...] = "all-linear"
    merge: bool = False


def lora_settings(node: Mapping[str, Any] | None) -> LoraSettings | None:
    """The :class:`LoraSettings` of a ``model.lora`` block, ``None`` when it is absent or
    ``enabled`` is false; an unknown key is a UserError (`fpo.settings_check` checked the
    numbers before anything loaded)."""
    if not node or not node.get("enabled", False):
        return None
    values = {key: node[key] for key in ("r", "alpha", "dropout", "merge") if key in node}
    unknown = set(node) - {*values, "enabled", "target_modules"}
    if unknown:
        raise UserError(f"model.lora: unknown key(s) {sorted(unknown)}; see docs/lora.md.")
    targets = node.get("target_modules", "all-linear")
    if not isinstance(targets, str):
        targets = tuple(str(name) for name in targets)
    if not targets:
        raise UserError("model.lora.target_modules is empty: name modules or use all-linear.")
    return LoraSettings(**values, target_modules=targets)  # numbers: fpo.settings_check


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model (never imports peft itself)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def add_adapters(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """``model`` wrapped in peft LoRA adapters (in place: its linear layers gain adapters;
    the base weights are frozen). UserError when ``target_modules`` matches nothing or
    includes the LM head (TDPO applies the reference's head after the adapter-free pass)."""
    try:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise UserError(
            f"model.lora.enabled=true needs peft ({err}): pip install 'fpo-template[lora]'."
        ) from err

    targets = settings.target_modules
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        policy = get_peft_model(model, config)
    except ValueError as err:  # no module matched
        raise UserError(f"model.lora.target_modules={targets!r}: {err}") from err
    if isinstance(policy.get_output_embeddings(), LoraLayer):
        raise UserError(
            f"model.lora.target_modules={targets!r} includes the LM head: leave it out (the "
            "reference's head would run with the adapters on), e.g. use all-linear."
        )
    trainable, total = policy.get_nb_trainable_parameters()
    log.info("LoRA r=%d on %s: %d of %d parameters train", settings.r, targets, trainable, total)
    return policy


class AdapterFreeReference(OnlineReference):
    """The online reference of a LoRA ``policy``: the policy itself with its adapters
    disabled, i.e. its initial weights (same arguments as `OnlineReference`).

    Unlike `OnlineReference` it neither copies, freezes nor registers the model (the policy
    stays the Lightning module's own child, in its own train/eval mode, its adapters
    trainable), and each pass restores the policy's mode.
    """

    def __init__(self, policy: nn.Module, **settings: Any) -> None:
        trainable = [p for p in policy.parameters() if p.requires_grad]
        training = policy.training
        super().__init__(policy, **settings)  # checks the hook and packing; freezes policy
        del self._modules["model"]  # not a child: no second train()/to()/state_dict entry
        self.__dict__["model"] = policy
        for parameter in trainable:
            parameter.requires_grad_(True)
        policy.train(training)

    def _apply(self, fn: Any, recurse: bool = True) -> AdapterFreeReference:
        """``to()``, ``cuda()`` and casts reach the policy too: fpo-cache's predictor owns only
        this reference (in training the module moves its policy first; this repeats it)."""
        self.model._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def stats(
        self, batch: dict, positions: Any, *, features: bool, token_kl: bool
    ) -> ReferenceStats:
        training = self.model.training
        try:
            with self.model.disable_adapter():
                return super().stats(batch, positions, features=features, token_kl=token_kl)
        finally:
            self.model.train(training)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``model`` with its LoRA adapters removed: for a peft model, the base
    model's own keys and tensors (the initial weights, as long as only adapters train);
    otherwise ``model.state_dict()``."""
    if not is_lora(model):
        return model.state_dict()
    state = model.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}


def merged_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`base_state_dict` of a LoRA ``policy`` with each adapter's update ``alpha / r *
    B A`` added to its layer's weight: the merged model's weights, ``policy`` untouched."""
    from peft.tuners.lora import LoraLayer

    state = base_state_dict(policy)
    for name, module in policy.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                key = f"{name}.weight"
                delta = module.get_delta_weight(adapter).to(state[key].dtype)
                state[key] = state[key] + delta
    return state


def save_lora_policy(policy: nn.Module, folder: Path, merge: bool) -> None:
    """Write a LoRA ``policy`` into ``folder``: its adapters (``adapter_config.json``,
    ``adapter_model.safetensors``), or with ``merge`` the merged full weights as an ordinary
    Hugging Face folder (``config.json``, ``model.safetensors``)."""
    if merge:
        base = policy.get_base_model()
        base.save_pretrained(folder, state_dict=merged_state_dict(policy))
    else:
        policy.save_pretrained(folder)


def load_adapters(model: nn.Module, folder: Path) -> nn.Module:
    """The adapters saved in ``folder`` loaded into the LoRA ``model`` (a fresh load of the
    run's model with the run's ``model.lora``); UserError when ``model`` has no adapters or
    they do not fit."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not is_lora(model):
        raise UserError(
            f"{folder} holds LoRA adapters ({ADAPTER_CONFIG}) but the run's model has none: "
            "keep the run's model.lora.enabled=true."
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise UserError(f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}.")
    state = load_file(folder / ADAPTER_WEIGHTS)
    expected = set(model.state_dict())
    result = set_peft_model_state_dict(model, state)
    missing = sorted(k for k in result.missing_keys if ".lora_" in k and k in expected)
    if result.unexpected_keys or missing:
        raise UserError(
            f"{folder}: the adapters do not fit the run's model.lora (missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]})."
        )
    return model
