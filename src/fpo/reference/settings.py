"""What a run's reference cache is: where it lives, what it stores, what it is tied to.

Both the builder (``fpo-cache``) and the trainer (``fpo-train reference=cached``) derive a
:class:`CacheSettings` from the same Hydra config with :func:`cache_settings`, and compute
the fingerprint of a split with the same :meth:`CacheSettings.components`, so the two
cannot drift apart. The components of one split, in message order:

==================  =====================================================================
data                sorted example ids of the split's valid rows (order-free)
tokenizer           vocab/merges/pipeline, special tokens, chat template
template            chat-template use, plain template, ``append_eos``
truncation          ``max_length``, ``max_prompt_length``
reference_weights   sha256 of the reference = the *initial* policy's state dict
sae_weights         sha256 of the SAE's state dict (``none`` for a log-probs-only cache)
sae_hook            the hook the SAE reads (``none`` likewise)
k                   top-k features stored per row (0: log-probs only)
dtype               dtype of the stored feature values
precision           the Lightning precision the values were computed under
versions            torch / transformers / sae-lens versions
==================  =====================================================================
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fpo.errors import UserError
from fpo.reference.fingerprint import hash_state_dict, library_versions
from fpo.reference.layout import normalize_values_dtype

#: Command-line overrides that cannot change a cache's values (left out of the command
#: printed to rebuild it). ``reference=`` is left out because fpo-cache forces ``cached``.
IRRELEVANT_OVERRIDES = (
    "hydra.",
    "reference=",
    "reference.source=",
    "logger",
    "callbacks",
    "optimizer",
    "scheduler",
    "ckpt_path",
    "optimized_metric",
    "hparams_search",
    "tags",
    "task_name",
)
#: The command-line switch that lets fpo-cache replace a cache built for other inputs.
OVERWRITE_OVERRIDE = "cache.overwrite=true"


@dataclass(frozen=True)
class CacheSettings:
    """A run's reference cache.

    Attributes:
        root: folder holding one cache folder per split (``root/train``, ``root/val``).
        k: pooled SAE features stored per row as top-k (0: log-probs only, no SAE).
        values_dtype: ``float16`` or ``float32``, dtype of the stored feature values.
        hook_name: where the SAE reads the residual stream (``None`` when ``k == 0``).
        precision: the Lightning ``trainer.precision`` the values are computed under.
        rebuild_command: the ``fpo-cache ...`` command that (re)builds this cache.
    """

    root: Path
    k: int
    values_dtype: str
    hook_name: str | None
    precision: str
    rebuild_command: str

    def split_path(self, split: str) -> Path:
        return self.root / split

    def model_fingerprints(self, reference: nn.Module, sae: nn.Module | None) -> dict[str, str]:
        """``reference_weights`` and ``sae_weights`` hashes; call BEFORE any training step."""
        return {
            "reference_weights": hash_state_dict(reference),
            "sae_weights": hash_state_dict(sae) if self.k > 0 and sae is not None else "none",
        }

    def components(
        self, datamodule: Any, split: str, model_fingerprints: Mapping[str, str]
    ) -> dict[str, str]:
        """The fingerprint components of ``split`` (module docstring), as strings.

        Args:
            datamodule: a ``PreferenceDataModule`` (its ``fingerprint_components(split)``
                gives ``data``, ``tokenizer``, ``template`` and ``truncation``).
            model_fingerprints: :meth:`model_fingerprints` of the reference and the SAE.
        """
        versions = ",".join(f"{name}={v}" for name, v in library_versions().items())
        return {
            **datamodule.fingerprint_components(split),
            "reference_weights": model_fingerprints["reference_weights"],
            "sae_weights": model_fingerprints["sae_weights"],
            "sae_hook": self.hook_name or "none",
            "k": str(self.k),
            "dtype": self.values_dtype,
            "precision": self.precision,
            "versions": versions,
        }


def cache_settings(cfg: DictConfig, *, k: int, hook_name: str | None) -> CacheSettings:
    """:class:`CacheSettings` from a composed fpo-train / fpo-cache config.

    ``k``: pooled SAE features stored per row (0: log-probs only), validated by the caller;
    ``hook_name``: the SAE's resolved hook (``None`` when ``k == 0``).
    """
    try:
        root = Path(str(cfg.reference.path)).expanduser()
    except OmegaConfBaseException as err:
        raise UserError(
            f"reference.path cannot be resolved outside a Hydra run ({err}); set "
            "reference.path=FOLDER explicitly."
        ) from err
    return CacheSettings(
        root=root,
        k=k,
        values_dtype=normalize_values_dtype(cfg.reference.get("values_dtype", "float32")),
        hook_name=hook_name if k > 0 else None,
        precision=str(cfg.trainer.get("precision", "32-true")),
        rebuild_command=rebuild_command(hydra_overrides(), root),
    )


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of the running Hydra job (``None`` outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def rebuild_command(overrides: Sequence[str] | None, root: Path) -> str:
    """``fpo-cache`` with the run's overrides that can change the cache (quoted for a shell).

    Outside Hydra (``overrides is None``) the cache folder is named explicitly instead.
    """
    if overrides is None:
        path = shlex.quote(f"reference.path={root}")
        return f"fpo-cache {path} <the model/data/sae/objective overrides of this run>"
    kept = [o for o in overrides if not o.lstrip("+~").startswith(IRRELEVANT_OVERRIDES)]
    return shlex.join(["fpo-cache", *kept])
