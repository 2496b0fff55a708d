"""Content hashes shared by the data module (example ids) and the reference cache (its
fingerprint: model and SAE weights and configs; its shard files' checksums)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

#: Model-config fields that cannot change the reference's values (at any nesting level).
VALUE_FREE_CONFIG_FIELDS = {"_name_or_path", "transformers_version", "_commit_hash", "use_cache"}
VALUE_FREE_CONFIG_FIELDS |= {"return_dict", "output_hidden_states", "output_attentions"}


def hash_json(obj: Any) -> str:
    """sha256 hex digest of ``obj`` as canonical JSON (sorted keys, no whitespace).

    Objects JSON cannot encode (paths, numpy scalars) are encoded via ``str``.
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def hash_state_dict(state: nn.Module | Mapping[str, Any]) -> str:
    """sha256 of a module's (or a state dict's) names, dtypes, shapes and bytes, in sorted
    name order (non-tensor entries: type and ``repr``). About 1 s per GB. A LoRA model
    hashes as its base model, adapters left out (`fpo.lora.base_state_dict`)."""
    if isinstance(state, nn.Module):
        from fpo.lora import base_state_dict  # fpo.lora imports the reference package

        state = base_state_dict(state)
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            digest.update(f"{value.dtype}|{tuple(value.shape)}\0".encode())
            flat = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(memoryview(flat.view(torch.uint8).numpy()))  # any dtype, bf16 too
        else:
            digest.update(f"{type(value).__qualname__}|{value!r}\0".encode())
    return digest.hexdigest()


def model_config_hash(model: nn.Module) -> str:
    """Hash of ``model.config.to_dict()`` (less :data:`VALUE_FREE_CONFIG_FIELDS`, at any
    depth) and of the attention implementation in use (``config._attn_implementation``)."""

    def without(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: without(v) for k, v in obj.items() if k not in VALUE_FREE_CONFIG_FIELDS}
        return [without(value) for value in obj] if isinstance(obj, list | tuple) else obj

    fields = without(model.config.to_dict())
    return hash_json({"config": fields, "attn": model.config._attn_implementation})


def sae_config_hash(sae: nn.Module) -> str:
    """Hash of the sae-lens ``sae.cfg.to_dict()`` (architecture, ``d_in``, ``d_sae``, ``k``,
    ``normalize_activations``, ``apply_b_dec_to_input``, dtype, metadata), less ``device``."""
    return hash_json({key: v for key, v in sae.cfg.to_dict().items() if key != "device"})


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file's bytes (read in blocks; about 1.5 ms per MB)."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()
