"""Fingerprints: short, deterministic hashes of everything that determines a cache's values.

A reference cache is tied to its inputs (DESIGN section 5): data content, tokenizer and
template, truncation, reference weights, SAE weights and hook, k, dtype and the library
versions that change numerics. The caller assembles a flat dict of *components*, each a short
string, e.g.::

    {"data": hash_json(rows), "tokenizer": ..., "template": ..., "truncation": ...,
     "reference_weights": hash_state_dict(model), "sae_weights": hash_state_dict(sae),
     "sae_hook": "blocks.17.hook_resid_post", "k": "50", "dtype": "float16",
     "versions": hash_json(library_versions())}

and the store compares two such dicts with :func:`compare_fingerprints`, so a mismatch names
exactly the components that differ.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import torch

from fpo.hashing import hash_json as hash_json  # re-exported for cache fingerprints

#: Libraries whose version changes the numbers a cache holds (kernels, model code, SAE code).
NUMERIC_LIBRARIES = ("torch", "transformers", "sae-lens")


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw bytes of a tensor as a flat contiguous CPU buffer (no copy when already so).

    Reinterpreting as ``uint8`` works for every dtype, bfloat16 included, which numpy lacks.
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def hash_state_dict(module_or_state_dict: torch.nn.Module | Mapping[str, Any]) -> str:
    """sha256 hex digest of a module's (or a state dict's) names, shapes, dtypes and bytes.

    Entries are visited in sorted name order, so the digest does not depend on insertion
    order. Each contributes ``name``, ``dtype``, ``shape`` and its raw bytes; a one-element
    change anywhere changes the digest. Non-tensor entries (e.g. ``_extra_state``) contribute
    their type and ``repr``. Cost: one sha256 pass over the bytes (~1 s per GB).
    """
    state = (
        module_or_state_dict.state_dict()
        if isinstance(module_or_state_dict, torch.nn.Module)
        else module_or_state_dict
    )
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode() + b"\0")
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if isinstance(value, torch.Tensor):
            header = f"{value.dtype}|{tuple(value.shape)}\0"
            digest.update(header.encode())
            digest.update(_tensor_bytes(value))
        else:
            digest.update(f"{type(value).__qualname__}|{value!r}\0".encode())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that change numerics, ``"absent"`` when missing."""
    versions = {}
    for name in NUMERIC_LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def compare_fingerprints(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """Names of the components that differ, in ``expected`` order, then those only in ``found``.

    A component present on one side only counts as differing.
    """
    names = list(expected) + [name for name in found if name not in expected]
    return [name for name in names if expected.get(name) != found.get(name)]


def short(value: Any, length: int = 12) -> str:
    """A component value shortened for messages: hex digests cut to ``length`` characters."""
    if value is None:
        return "<absent>"
    text = str(value)
    return text[:length] if len(text) > length and _is_hex(text) else text


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)
