"""The trained policy's final weights: saved at the end of ``fpo-train``, read by ``fpo-eval``.

``<run>/policy/`` is a Hugging Face folder (``save_pretrained``: ``config.json``,
``model.safetensors``, generation config, tokenizer), independent of Lightning's checkpoint
format and of resume checkpoints. It is written when ``save_policy`` is true, or ``auto``
(the default) and the run has an ``evaluation`` block, i.e. when the run may be evaluated
again. ``fpo-eval`` loads it *into a fresh load of the run's own model* (``cfg.model.loader``),
so the tokenizer, generation config and dtype are the run's; a Lightning checkpoint
(``ckpt_path=``, ``state_dict`` keys ``policy.*``) works too. A model card (``README.md``,
`fpo.model_card`) goes beside the weights, so the folder can be published as it is
(``fpo-push``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from fpo.checkpoints import AtomicCheckpointIO
from fpo.errors import UserError
from fpo.lora import ADAPTER_CONFIG, is_lora, load_adapters, save_lora_policy
from fpo.model_card import CardValues, write_model_card

log = logging.getLogger("fpo.policy_io")
POLICY_DIR = "policy"


def should_save_policy(value: bool | str, has_evaluation: bool) -> bool:
    """``save_policy`` ``value``: true, false, or ``auto`` (when the run has an
    ``evaluation`` block: ``has_evaluation``)."""
    if isinstance(value, str):
        if value != "auto":
            raise UserError(f"save_policy={value!r}: choose true, false or auto.")
        return has_evaluation
    return bool(value)


def save_policy(
    policy: nn.Module,
    tokenizer: Any,
    folder: str | os.PathLike,
    card: CardValues | None = None,
    merge_adapters: bool = False,
) -> Path:
    """``save_pretrained`` of the policy (safetensors) and its tokenizer into ``folder``, and
    the model card ``README.md`` from ``card`` (not evaluated yet: the evaluation block is
    filled in by `fpo.model_card.refresh_card_evaluation`). A LoRA policy saves its adapters,
    or with ``merge_adapters`` the merged full weights (`fpo.lora.save_lora_policy`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if is_lora(policy):
        save_lora_policy(policy, folder, merge_adapters)
    else:
        policy.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if card is not None:
        write_model_card(folder, card)
    log.info("final policy weights saved to %s", folder)
    return folder


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(folder / shard))
        return state
    single = folder / "model.safetensors"
    if not single.is_file():
        raise UserError(f"{folder}: no model.safetensors (not a saved policy folder).")
    return load_file(single)


def _checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu")  # weights only
    state = checkpoint.get("state_dict", checkpoint)
    policy = {k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")}
    if not policy:
        raise UserError(f"{path}: the checkpoint's state_dict has no policy.* weights.")
    return policy


def load_policy_weights(model: nn.Module, source: str | os.PathLike) -> nn.Module:
    """Load a saved policy folder or a Lightning checkpoint into ``model`` (in place) and
    return the model to use: ``model``, or for a LoRA model given merged full weights, its
    base model without adapters.

    Every parameter must be found, except the LM head when it is tied to the embeddings
    (``save_pretrained`` stores it once); unexpected keys are an error. A folder of LoRA
    adapters loads into the run's LoRA model (`fpo.lora.load_adapters`).
    """
    source = Path(source)
    if not source.exists():
        raise UserError(f"{source}: no saved policy there.")
    if (source / ADAPTER_CONFIG).is_file():
        return load_adapters(model, source)
    if is_lora(model) and source.is_dir():  # merged weights (model.lora.merge=true)
        model = model.unload()
    state = _folder_state(source) if source.is_dir() else _checkpoint_state(source)
    missing, unexpected = model.load_state_dict(state, strict=False)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    allowed = {
        name
        for name, p in model.named_parameters(remove_duplicate=False)
        if tied and p is head.weight
    }
    missing = [key for key in missing if key not in allowed]
    if missing or unexpected:
        raise UserError(
            f"{source} does not match the run's model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]} (was it saved from another model config?)."
        )
    return model
