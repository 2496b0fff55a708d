"""Storage of the offline reference cache: atomic, resumable, verified, memory-mapped.

Per preference pair (key: the stable string ``example_id``) the cache holds the reference's
``sum_logps``, ``avg_logps`` (float32) and ``n_tokens`` (int32) for chosen and rejected, and
its pooled SAE features as top-k ``topk_indices`` (int32 ``[k]``) / ``topk_values``
(float16 or float32 ``[k]``); with ``k = 0`` (a DPO-only cache) the top-k columns are absent.

This module gathers the storage API in one import; the code lives in
:mod:`fpo.reference.layout` (folder layout, schema, file helpers),
:mod:`fpo.reference.writer` (per-rank writing, :func:`finalize`) and
:mod:`fpo.reference.reader` (verified memory-mapped reading, the dataset join, ``--info``).
"""

from fpo.reference.layout import (
    MANIFEST,
    cache_schema,
    completed_ids,
    normalize_values_dtype,
)
from fpo.reference.reader import (
    CachedReferenceDataset,
    ReferenceCache,
    cache_info,
    format_cache_info,
)
from fpo.reference.writer import ReferenceCacheWriter, finalize

__all__ = [
    "MANIFEST",
    "CachedReferenceDataset",
    "ReferenceCache",
    "ReferenceCacheWriter",
    "cache_info",
    "cache_schema",
    "completed_ids",
    "finalize",
    "format_cache_info",
    "normalize_values_dtype",
]
