"""Training from the offline cache: open, check and join it; never build a reference model.

For each split, :func:`attach_reference_cache` refuses an incomplete or damaged cache and
any fingerprint component that differs from this run's -- except ``data``, where coverage
is what matters: values are keyed by a content hash of each pair, so a cache built on a
superset of the rows (this run shuffles, filters or limits them) is valid, while a changed
or added row is missing from it and refused, naming ``data``. Every refusal prints the
``fpo-cache`` command that rebuilds the cache. The data module then serves each item
joined by ``example_id`` to its ``ref_*`` values, which :class:`BatchReference` reads.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

from torch import nn

from fpo.errors import UserError
from fpo.reference.settings import OVERWRITE_OVERRIDE, CacheSettings, short
from fpo.reference.store import MANIFEST, CachedReferenceDataset, ReferenceCache


def open_split_cache(
    settings: CacheSettings, datamodule: Any, split: str, model_fingerprints: Mapping[str, str]
) -> ReferenceCache:
    """Open and check the cache of ``split`` for this run (module docstring)."""
    path = settings.split_path(split)
    command = settings.rebuild_command
    if (path / MANIFEST).is_file():  # replacing a finished cache needs the overwrite switch
        command = f"{command} {OVERWRITE_OVERRIDE}"
    expected = settings.components(datamodule, split, model_fingerprints)
    cache = ReferenceCache.open(path, expected, command, ignore_components=("data",))
    ids = datamodule.dataset(split, wrapped=False).example_ids
    if missing := cache.missing(ids):
        found = cache.manifest["components"].get("data")
        raise UserError(
            f"The reference cache at {path} was built for other inputs. Differing components "
            f"(expected = this run):\n  data: expected {short(expected['data'])}, found "
            f"{short(found)}; {len(missing)} of the {len(ids)} pairs of the {split} split "
            f"are not in the cache (first example ids: {', '.join(missing[:3])})\n"
            f"Rebuild it with: {command}"
        )
    return cache


def join(caches: Mapping[str, ReferenceCache], split: str, dataset: Any) -> CachedReferenceDataset:
    return CachedReferenceDataset(dataset, caches[split])


def attach_reference_cache(
    settings: CacheSettings, datamodule: Any, policy: nn.Module, sae: nn.Module | None
) -> dict[str, ReferenceCache]:
    """Check the cache of every split and join the data module's datasets to it.

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
    datamodule.set_dataset_wrapper(partial(join, caches))
    return caches
