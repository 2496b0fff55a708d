"""What a run's reference cache is: where it lives, what it stores, what it is tied to.

``fpo-cache`` and ``fpo-train reference=cached`` both derive :class:`CacheSettings` with
:func:`cache_settings` (through ``fpo.builder.RunParts.cache_settings``) and fingerprint a
split with :meth:`CacheSettings.components`, so they cannot drift apart. The components
of one split, in message order, each a string:

==================  =====================================================================
data                sorted example ids of the split's valid rows (order-free)
tokenizer           vocab/merges/pipeline, special tokens, chat template
template            chat-template use, plain template, ``append_eos``
truncation          ``max_length``, ``max_prompt_length``
reference_weights   sha256 of the reference = the *initial* policy's state dict (LoRA: base)
reference_config    model config (soft-capping, rope, ...) and attention implementation
sae_weights         sha256 of the SAE's state dict (``none`` for a log-probs-only cache)
sae_config          SAE config: architecture, k, d_in, d_sae, normalization, b_dec, ...
sae_hook            the hook the SAE reads (``none`` likewise)
k                   top-k features stored per row (0: log-probs only)
dtype               dtype of the stored feature values
precision           the Lightning precision the values were computed under
versions            torch / transformers / sae-lens versions
==================  =====================================================================
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from torch import nn

from fpo.errors import UserError
from fpo.hashing import hash_state_dict, model_config_hash, sae_config_hash

#: Command-line overrides that cannot change a cache's values (left out of the command
#: printed to rebuild it). ``reference=`` is left out because fpo-cache forces ``cached``.
IRRELEVANT_OVERRIDES = ("hydra.", "reference=", "reference.source=", "logger", "callbacks")
IRRELEVANT_OVERRIDES += ("optimizer", "scheduler", "ckpt_path", "optimized_metric")
IRRELEVANT_OVERRIDES += ("hparams_search", "tags", "task_name")
# Packing (fpo.packing) is the same computation without the pads (equal up to float rounding),
# so it is no part of a cache's fingerprint: a padded cache serves a packed run and back.
# Nor is model.lora: the reference is the base model, adapters off (fpo.lora).
IRRELEVANT_OVERRIDES += ("model.packed", "model.pack_length", "model.lora")
#: The command-line switch that lets fpo-cache replace a cache built for other inputs.
OVERWRITE_OVERRIDE = "cache.overwrite=true"


@dataclass(frozen=True)
class CacheSettings:
    """A run's reference cache: one folder per split under ``root`` (``root/train``), ``k``
    top-k pooled SAE features per row (0: log-probs only, no SAE) stored as ``values_dtype``
    (``float16``/``float32``), the SAE's ``hook_name`` (``None`` when ``k == 0``), the
    Lightning ``precision`` of the values and the ``fpo-cache`` command that (re)builds it."""

    root: Path
    k: int
    values_dtype: str
    hook_name: str | None
    precision: str
    rebuild_command: str

    def split_path(self, split: str) -> Path:
        return self.root / split

    def model_fingerprints(self, reference: nn.Module, sae: nn.Module | None) -> dict[str, str]:
        """Weights and config hashes of the reference (call it BEFORE any training step: the
        reference is the *initial* policy) and of the SAE (``none`` when ``k == 0``)."""
        use_sae = self.k > 0 and sae is not None
        return {
            "reference_weights": hash_state_dict(reference),
            "reference_config": model_config_hash(reference),
            "sae_weights": hash_state_dict(sae) if use_sae else "none",
            "sae_config": sae_config_hash(sae) if use_sae else "none",
        }

    def components(
        self, datamodule: Any, split: str, model_fingerprints: Mapping[str, str]
    ) -> dict[str, str]:
        """The fingerprint components of ``split`` (module docstring), in message order:
        the ``PreferenceDataModule``'s ``fingerprint_components(split)`` (``data`` to
        ``truncation``), ``model_fingerprints`` (:meth:`model_fingerprints`), then ours."""
        return {
            **datamodule.fingerprint_components(split),
            **model_fingerprints,
            "sae_hook": self.hook_name or "none",
            "k": str(self.k),
            "dtype": self.values_dtype,
            "precision": self.precision,
            "versions": ",".join(f"{name}={v}" for name, v in library_versions().items()),
        }


def cache_settings(
    root: Path, *, k: int, hook_name: str | None, values_dtype: str, precision: str
) -> CacheSettings:
    """:class:`CacheSettings` of the folder ``root``: ``k`` pooled SAE features per row (0:
    log-probs only; the caller checked ``1 <= k <= d_sae``) read at ``hook_name``, stored as
    ``values_dtype`` (:func:`normalize_values_dtype`), computed under ``precision``."""
    return CacheSettings(
        root=root,
        k=int(k),
        values_dtype=normalize_values_dtype(values_dtype),
        hook_name=hook_name if k > 0 else None,
        precision=precision,
        rebuild_command=rebuild_command(root),
    )


def normalize_values_dtype(name: str) -> str:
    """``"float16"`` or ``"float32"`` (aliases fp16, half, fp32 accepted)."""
    name = {"fp16": "float16", "half": "float16", "fp32": "float32"}.get(str(name), str(name))
    if name not in ("float16", "float32"):
        raise UserError(f"values_dtype must be float16 or float32 for the cache, got {name!r}.")
    return name


def rebuild_command(root: Path) -> str:
    """``fpo-cache`` with the Hydra job's overrides that can change the cache (quoted for a
    shell); outside a Hydra job the cache folder is named explicitly instead."""
    if not HydraConfig.initialized():
        path = shlex.quote(f"reference.path={root}")
        return f"fpo-cache {path} <the model/data/sae/objective overrides of this run>"
    overrides = HydraConfig.get().overrides.task
    kept = [o for o in overrides if not o.lstrip("+~").startswith(IRRELEVANT_OVERRIDES)]
    return shlex.join(["fpo-cache", *kept])


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries that change numerics."""
    return {name: metadata.version(name) for name in ("torch", "transformers", "sae-lens")}


def short(value: Any, length: int = 12) -> str:
    """A component value for messages: hex digests cut to ``length`` characters."""
    text = "<absent>" if value is None else str(value)
    is_hex = all(c in "0123456789abcdef" for c in text)
    return text[:length] if len(text) > length and is_hex else text


def differences(
    expected: Mapping[str, Any], found: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """One line ``  name: expected <short>, found <short>`` per differing component, in
    ``expected`` order, then those only in ``found``; components in ``ignore`` skipped."""
    return [
        f"  {name}: expected {short(expected.get(name))}, found {short(found.get(name))}"
        for name in {**expected, **found}
        if name not in ignore and expected.get(name) != found.get(name)
    ]
