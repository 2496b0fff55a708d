"""The reference's side of an evaluation, kept across runs that share the reference.

Everything the evaluation computes from the reference alone is a deterministic function of
the reference's weights, the inputs and the settings: its samples on a prompt set (seeded,
`fpo.evaluation.sentiment`) and its statistics on the held-out pairs (log-probs, entropy,
pooled SAE features and top contexts, `fpo.evaluation.heldout`). Every run of a sweep or
study against one reference (``evaluation.reference_cache_dir``) computes them once; the
next runs read them back, with the same numbers bit for bit.

An entry is one file ``<root>/<kind>-<digest>.pt`` (``torch.save``, read with
``weights_only=True``) holding its *key* and its value. The key is everything the value
depends on: `reference_identity` (the reference's weights and config, the device, the
libraries), then the caller's components (the prompts as token ids, the tokenizer, seeds,
batch sizes, ... or the pair batches' ids, the SAE's weights, the chunk size, ...). The
digest is the key's sha256: a run with other inputs looks for another file; a file whose
stored key differs from the one asked for (a collision, an edited or damaged file) is
refused with a warning and computed again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fpo.atomic import atomic_save_bytes
from fpo.hashing import hash_json, hash_state_dict, model_config_hash
from fpo.reference.settings import library_versions

log = logging.getLogger("fpo.evaluation")

#: Bump when what an entry holds or how it is computed changes: older files are not read.
LAYOUT_VERSION = "1"


def distinct_tensors(model: nn.Module) -> dict[str, Any]:
    """``model``'s state dict with each shared tensor once, under its first name in sorted
    order (a tied LM head is its embedding: hashed once; the tie is in the config)."""
    state, seen, kept = model.state_dict(), set(), {}
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            where = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
            if where in seen:
                continue
            seen.add(where)
        kept[name] = value
    return kept


def reference_identity(reference: nn.Module) -> dict[str, str]:
    """The components of every key that describe the reference and where it runs: sha256 of
    its weights (`distinct_tensors`; about 1 s per GB), its config and attention
    implementation, its device type, and the torch / transformers / sae-lens versions."""
    device = next(reference.parameters()).device
    return {
        "layout": LAYOUT_VERSION,
        "reference_weights": hash_state_dict(distinct_tensors(reference)),
        "reference_config": model_config_hash(reference),
        "device": device.type,
        "versions": ",".join(f"{name}={v}" for name, v in library_versions().items()),
    }


@dataclass(frozen=True)
class ReferenceSideCache:
    """Reference-side results under ``root``, each keyed by ``identity`` (`reference_identity`
    of the reference they were computed with) plus its own components (module docstring)."""

    root: Path
    identity: Mapping[str, str]

    def path(self, kind: str, key: Mapping[str, Any]) -> Path:
        return self.root / f"{kind}-{hash_json(key)[:32]}.pt"

    def fetch(
        self, kind: str, components: Mapping[str, Any], compute: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """The stored value of ``(kind, components)``, or ``compute()``'s, which is stored.

        ``components`` must be JSON-encodable (lists of ids, strings, numbers); the value a
        dict of tensors, lists, numbers and strings.
        """
        key = {"kind": kind, **self.identity, **components}
        path = self.path(kind, key)
        stored = self._read(path)
        if stored is not None:
            if stored.get("key") == hash_json(key):
                log.info("evaluation: the reference's %s read from %s", kind, path)
                return stored["value"]
            log.warning("%s: stored for other inputs than this run's; computing it again", path)
        value = compute()
        atomic_save_bytes(path, lambda f: torch.save({"key": hash_json(key), "value": value}, f))
        log.info("evaluation: the reference's %s stored in %s", kind, path)
        return value

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        if not path.is_file():
            return None
        try:
            stored = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a damaged file is computed again, never trusted
            log.warning("%s: unreadable (%s); computing it again", path, error)
            return None
        return stored if isinstance(stored, dict) else {}


def reference_side_cache(
    root: str | Path | None, reference: nn.Module
) -> ReferenceSideCache | None:
    """The cache under ``root`` for ``reference`` (``None``: no cache, everything computed)."""
    if root is None:
        return None
    return ReferenceSideCache(Path(root), reference_identity(reference))
