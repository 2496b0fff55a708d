"""Training from the offline cache: open, verify and join it; never build a reference model.

``fpo-train reference=cached`` calls :func:`attach_reference_cache` before fitting. For each
split of the data module it opens ``settings.split_path(split)`` and checks:

* the build is complete (it has a manifest) and its shards are intact (sizes, sha256);
* every fingerprint component equals the one this run computes with the same
  :meth:`CacheSettings.components` the builder used -- except ``data``, where *coverage*
  is what matters: each value is keyed by a content hash of its pair, so a cache built on
  a superset of the rows (this run shuffles, filters or limits them) is valid, while a
  changed or added row is missing from it and refused, naming ``data``.

Any refusal names the differing component(s) and prints the ``fpo-cache`` command that
rebuilds the cache. Then the data module serves every item joined by ``example_id`` to its
reference values (:class:`CachedReferenceDataset`), which the collator stacks into the
``ref_*`` batch fields that :class:`fpo.reference.base.BatchReference` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from fpo.errors import UserError
from fpo.reference.fingerprint import short
from fpo.reference.layout import MANIFEST
from fpo.reference.reader import CachedReferenceDataset, ReferenceCache
from fpo.reference.settings import OVERWRITE_OVERRIDE, CacheSettings

#: Components compared by coverage instead of equality (see the module docstring).
COVERAGE_COMPONENTS = ("data",)


class JoinCache:
    """Dataset wrapper for ``PreferenceDataModule.set_dataset_wrapper``: the cache join."""

    def __init__(self, caches: Mapping[str, ReferenceCache]) -> None:
        self.caches = dict(caches)

    def __call__(self, split: str, dataset: Dataset) -> Dataset:
        return CachedReferenceDataset(dataset, self.caches[split])


def open_split_cache(
    settings: CacheSettings,
    datamodule: Any,
    split: str,
    model_fingerprints: Mapping[str, str],
) -> ReferenceCache:
    """Open and verify the cache of ``split`` for this run (module docstring)."""
    path = settings.split_path(split)
    command = settings.rebuild_command
    if (path / MANIFEST).is_file():  # replacing a finished cache needs the overwrite switch
        command = f"{command} {OVERWRITE_OVERRIDE}"
    expected = settings.components(datamodule, split, model_fingerprints)
    cache = ReferenceCache.open(
        path, expected, verify=True, rebuild_command=command, ignore_components=COVERAGE_COMPONENTS
    )
    ids = datamodule.dataset(split, wrapped=False).example_ids
    missing = cache.missing(ids)
    if missing:
        found = cache.manifest["components"].get("data")
        raise UserError(
            f"The reference cache at {path} was built for other inputs. Differing components "
            f"(expected = this run):\n  data: expected {short(expected['data'])}, found "
            f"{short(found)}; {len(missing)} of the {len(ids)} pairs of the {split} split "
            f"are not in the cache (first example ids: {', '.join(missing[:3])})\n"
            f"Rebuild it with: {command}"
        )
    return cache


def attach_reference_cache(
    settings: CacheSettings, datamodule: Any, policy: nn.Module, sae: nn.Module | None
) -> dict[str, ReferenceCache]:
    """Verify the cache of every split and join the data module's datasets to it.

    Args:
        settings: from :func:`fpo.reference.settings.cache_settings`.
        datamodule: a ``PreferenceDataModule`` with its tokenizer set.
        policy: the policy *before* training: its weights are the reference's.
        sae: the SAE (FPO), else ``None``.

    Returns:
        ``{split: ReferenceCache}``. Raises :class:`UserError` naming what differs.
    """
    fingerprints = settings.model_fingerprints(policy, sae)
    caches = {
        split: open_split_cache(settings, datamodule, split, fingerprints)
        for split in datamodule.splits
    }
    datamodule.set_dataset_wrapper(JoinCache(caches))
    return caches
