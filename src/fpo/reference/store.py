"""The offline reference cache on disk, and training from it.

A cache folder ``PATH`` (one per data split) holds ``PATH/shards/rank{r}-{n:05d}.arrow``,
Arrow IPC files each written atomically by rank r alone, their schema metadata holding the
fingerprint (so a partial build can be checked and resumed), and ``PATH/manifest.json``,
written LAST by rank 0 (fingerprint, each shard's rows, bytes and sha256): without it the
cache is incomplete and never loaded. Opening checks each shard's size, sha256 and footer.

One row per pair, keyed by the stable string ``example_id``; per side (chosen, rejected):
``sum_logps``, ``avg_logps`` (float32), ``n_tokens`` (int32) and, when ``k > 0``,
``topk_indices`` (int32 ``[k]``) and ``topk_values`` (float16 or float32 ``[k]``). Plain
Arrow: string keys beside ``[k]`` lists, zero-copy numpy views through ``pa.memory_map``.

Training (:func:`attach_reference_cache`) refuses an incomplete or damaged cache and any
differing fingerprint component, but accepts a cache of a superset of its rows (pairs are
keyed by a content hash; a changed or added row is refused, naming ``data``) and, for a run
without the feature term, a cache that also stores features (``FEATURE_COMPONENTS``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from functools import partial
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from fpo.cache_checksums import checksum_problem, note_unverified
from fpo.errors import UserError
from fpo.reference.settings import OVERWRITE_OVERRIDE, CacheSettings, differences, short

if TYPE_CHECKING:
    from fpo.reference.base import ReferenceStats

MANIFEST = "manifest.json"
#: The keys of a manifest of this layout (older fpo versions wrote others).
MANIFEST_KEYS = {"num_pairs", "num_rows", "k", "values_dtype", "total_bytes", "bytes_per_pair"}
MANIFEST_KEYS |= {"world_size", "components", "shards"}
SIDES = ("chosen", "rejected")
#: What only the stored features depend on: a run without the feature term (``k == 0``, e.g.
#: FPO at alpha 0, or DPO) may read the log-probs of a cache built with features.
FEATURE_COMPONENTS = ("sae_weights", "sae_config", "sae_hook", "k", "dtype")
_META = b"fpo.fingerprint"
_REBUILD = "the fpo-cache command that built it, plus cache.overwrite=true"


def field_types(k: int, values_dtype: str) -> dict[str, str]:
    """Stored dtype of each per-side field; the top-k fields only when ``k > 0``."""
    types = {"sum_logps": "float32", "avg_logps": "float32", "n_tokens": "int32"}
    return (types | {"topk_indices": "int32", "topk_values": values_dtype}) if k else types


def item_field(side: str, name: str) -> str:
    """A cached field's key in a dataset item, ``ref_<side>_<name>`` (the collator stacks the
    two sides into the batch's ``ref_<name>``, which `BatchReference` reads)."""
    return f"ref_{side}_{name}"


def cache_rows(stats: ReferenceStats) -> dict[str, dict[str, torch.Tensor]]:
    """The cache row layout of a batch's reference statistics (``[2B]`` rows, chosen then
    rejected): ``{side: {name: [B] or [B, k] CPU tensor}}`` for each of `SIDES` and each
    field of `field_types` (the top-k pair only when ``stats`` holds features)."""
    logps = stats.logps
    values = {"sum_logps": logps.sum, "avg_logps": logps.avg, "n_tokens": logps.n_tokens}
    if stats.topk_indices is not None:
        values |= {"topk_indices": stats.topk_indices, "topk_values": stats.topk_values}
    halves = {name: value.cpu().chunk(2) for name, value in values.items()}
    return {side: {name: pair[i] for name, pair in halves.items()} for i, side in enumerate(SIDES)}


def cache_schema(k: int, values_dtype: str, fingerprint: Mapping | None = None) -> pa.Schema:
    """Arrow schema of a shard: top-k fields as ``[k]`` lists, ``fingerprint`` as metadata."""
    fields = [pa.field("example_id", pa.string())]
    for side, (name, alias) in product(SIDES, field_types(k, values_dtype).items()):
        type_ = pa.type_for_alias(alias)
        fields.append(
            pa.field(f"{side}_{name}", pa.list_(type_, k) if name[:4] == "topk" else type_)
        )
    metadata = {_META: json.dumps(dict(fingerprint))} if fingerprint else None
    return pa.schema(fields, metadata=metadata)


def read_manifest(path: Path, rebuild_command: str = _REBUILD) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path / MANIFEST} ({err}): the cache is corrupt.") from err
    if not isinstance(manifest, dict) or manifest.keys() != MANIFEST_KEYS:
        raise UserError(
            f"The reference cache at {path} was built by an older fpo version: its {MANIFEST} "
            f"has another layout and cannot be read. Rebuild it with: {rebuild_command}"
        )
    return manifest


def open_shard(file: Path, entry: Mapping | None = None, schema=None, command=_REBUILD) -> pa.Table:
    """A shard as a memory-mapped table. With its manifest ``entry``, first checks that it
    exists and has the recorded bytes, then the ``schema``, the rows and the sha256. A
    UserError names the file when a check fails or the Arrow footer cannot be read."""
    size = file.stat().st_size if file.is_file() else None
    if size is None:
        problem = "is missing"
    elif entry and size != entry["bytes"]:
        problem = f"has {size} bytes where the manifest records {entry['bytes']} (truncated?)"
    else:
        try:
            table = pa.ipc.open_file(pa.memory_map(str(file))).read_all()
        except (OSError, pa.ArrowException) as err:
            problem = f"cannot be read ({err})"
        else:
            same = not entry or (table.schema.equals(schema) and table.num_rows == entry["rows"])
            problem = checksum_problem(file, entry or {}) if same else "is stale"
    if problem:
        raise UserError(
            f"The reference cache at {file.parent.parent} is damaged: shard {file} {problem}. "
            f"Rebuild it with: {command}"
        )
    return table


def shards(path: str | os.PathLike) -> list[tuple[Path, pa.Table]]:
    """The completed shards of a folder (temp files start with a dot: never listed)."""
    return [(file, open_shard(file)) for file in sorted(Path(path).glob("shards/rank*-*.arrow"))]


def shard_fingerprint(table: pa.Table) -> dict[str, str]:
    return json.loads((table.schema.metadata or {}).get(_META, b"{}"))


def completed_ids(path: str | os.PathLike) -> set[str]:
    """Ids in the completed shards of a folder, of every rank (to skip them when resuming)."""
    return {i for _, table in shards(path) for i in table.column("example_id").to_pylist()}


def other_inputs(path: Path, lines: list[str], rebuild_command: str) -> UserError:
    return UserError(
        f"The reference cache at {path} was built for other inputs. Differing components "
        "(expected = this run):\n" + "\n".join(lines) + f"\nRebuild it with: {rebuild_command}"
    )


class ReferenceCache:
    """A finished cache, memory-mapped, indexed by example id. Build with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, columns: list, index: dict, command: str):
        self.path, self.manifest, self.rebuild_command = path, manifest, command
        self.k, self._columns, self._index = int(manifest["k"]), columns, index

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_components: Mapping[str, Any] | None = None,
        rebuild_command: str = "fpo-cache ...",
        example_ids: Iterable[str] | None = None,
    ) -> ReferenceCache:
        """Check completeness, fingerprint and shards, then map the shards and index the ids.

        Raises UserError on a missing folder, a missing manifest (interrupted build), any
        component differing from ``expected_components`` (each named), and a missing,
        truncated, changed or unreadable shard (the file named). With ``example_ids`` (the run's
        pairs), ``data`` may differ as long as every one of them is stored.
        """
        path = Path(path)
        if not path.is_dir():
            raise UserError(
                f"No reference cache at {path}: the folder does not exist. "
                f"Build it with: {rebuild_command}"
            )
        if not (path / MANIFEST).is_file():
            raise UserError(
                f"The reference cache at {path} is incomplete: it has no {MANIFEST}, so its "
                "build was interrupted before finalizing (or is still running). Resume or "
                f"rebuild it with: {rebuild_command}"
            )
        manifest = read_manifest(path, rebuild_command)
        note_unverified(path, manifest)
        expected = {name: str(value) for name, value in (expected_components or {}).items()}
        ignore = ("data",) if example_ids is not None else ()
        if expected.get("k") == "0" and int(manifest["k"]) > 0:
            ignore += FEATURE_COMPONENTS  # a run without the feature term reads the log-probs
        if expected and (lines := differences(expected, manifest["components"], ignore)):
            raise other_inputs(path, lines, rebuild_command)
        schema, columns, index = cache_schema(manifest["k"], manifest["values_dtype"]), [], {}
        for entry in manifest["shards"]:
            table = open_shard(path / entry["file"], entry, schema, rebuild_command)
            for batch in table.to_batches():
                columns.append({name: _numpy(batch.column(name)) for name in schema.names[1:]})
                for row, example_id in enumerate(batch.column("example_id").to_pylist()):
                    index.setdefault(example_id, (len(columns) - 1, row))
        cache = cls(path, manifest, columns, index, rebuild_command)
        if example_ids is not None and (missing := cache.missing(ids := list(example_ids))):
            line = (
                f"  data: expected {short(expected.get('data'))}, found "
                f"{short(manifest['components'].get('data'))}; {len(missing)} of the {len(ids)} "
                f"pairs of the {path.name} split are not in the cache (first example ids: "
                f"{', '.join(missing[:3])})"
            )
            raise other_inputs(path, [line], rebuild_command)
        return cache

    def __len__(self) -> int:
        return len(self._index)

    def __reduce__(self) -> tuple:  # dataloader workers re-map the files instead of copying
        return ReferenceCache.open, (self.path, None, self.rebuild_command)

    def missing(self, example_ids: Iterable[str]) -> list[str]:
        return [i for i in example_ids if i not in self._index]

    def get(self, example_id: str) -> dict[str, Any]:
        """``ref_{chosen,rejected}_{sum_logps,avg_logps,n_tokens,topk_indices,topk_values}``:
        scalars as Python numbers, top-k as int64 / float32 ``[k]`` (``[0]`` if ``k == 0``)."""
        if example_id not in self._index:
            raise UserError(
                f"Example id {example_id!r} is not in the reference cache at {self.path} "
                f"({len(self)} pairs): the cache was built for other data. Rebuild it with: "
                f"{self.rebuild_command}"
            )
        shard, row = self._index[example_id]
        columns, out = self._columns[shard], {}
        for side in SIDES:
            for name in ("sum_logps", "avg_logps", "n_tokens"):
                out[item_field(side, name)] = columns[f"{side}_{name}"][row].item()
            for name, dtype in (("topk_indices", np.int64), ("topk_values", np.float32)):
                column = columns.get(f"{side}_{name}")
                out[item_field(side, name)] = (column[row] if self.k else np.empty(0)).astype(dtype)
        return out


def _numpy(column: pa.Array) -> np.ndarray:
    """Zero-copy numpy view of a numeric column, ``[N]`` or ``[N, k]`` for ``[k]`` lists."""
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy().reshape(len(column), column.type.list_size)
    return column.to_numpy()


class CachedReferenceDataset(torch.utils.data.Dataset):
    """``dataset[i]`` (a dict with ``example_id``) updated with the cache's ``ref_*`` fields:
    joined by id, never by row order, so rows may be shuffled or filtered freely."""

    def __init__(self, dataset: Any, cache: ReferenceCache) -> None:
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        return example | self.cache.get(example["example_id"])


def _join(caches: Mapping[str, ReferenceCache], split: str, dataset: Any) -> Any:
    return CachedReferenceDataset(dataset, caches[split])


def attach_reference_cache(
    settings: CacheSettings, datamodule: Any, policy: nn.Module, sae: nn.Module | None
) -> dict[str, ReferenceCache]:
    """Check the cache of every split of ``datamodule`` (a ``PreferenceDataModule``) as the
    module docstring says, with the fingerprints of ``policy`` *before* training (the
    reference) and ``sae`` (FPO, else ``None``), and join its datasets to the caches by
    ``example_id`` for :class:`~fpo.reference.base.BatchReference`. ``{split: cache}``."""
    fingerprints, caches = settings.model_fingerprints(policy, sae), {}
    for split in datamodule.splits:
        path, command = settings.split_path(split), settings.rebuild_command
        if (path / MANIFEST).is_file():  # replacing a finished cache needs the overwrite switch
            command = f"{command} {OVERWRITE_OVERRIDE}"
        expected = settings.components(datamodule, split, fingerprints)
        ids = datamodule.dataset(split, wrapped=False).example_ids
        caches[split] = ReferenceCache.open(path, expected, command, example_ids=ids)
    datamodule.set_dataset_wrapper(partial(_join, caches))
    return caches


_INFO = """reference cache {path}: complete
  pairs {num_pairs}, rows {num_rows}, k {k}, values {values_dtype}, indices int32
  size {total_bytes} bytes in {num_shards} shards, {bytes_per_pair:.1f} bytes per pair
  built by {world_size} rank(s)
  components:"""
_INCOMPLETE_INFO = "reference cache {path}: INCOMPLETE: {num_rows} pairs in {num_shards} shards; "
_INCOMPLETE_INFO += "resume with the fpo-cache command that started it"


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``fpo-cache --info PATH`` shows; an incomplete build reports its progress."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        info = read_manifest(path)
        return {"path": str(path), "complete": True, "num_shards": len(info.pop("shards")), **info}
    if not path.is_dir():
        raise UserError(f"No reference cache at {path}: the folder does not exist.")
    tables = [table for _, table in shards(path)]
    info = {"path": str(path), "complete": False, "num_shards": len(tables)}
    info |= {"num_rows": sum(table.num_rows for table in tables)}
    return info | {"components": shard_fingerprint(tables[0]) if tables else {}}


def format_cache_info(info: Mapping[str, Any]) -> str:
    """Human-readable rendering of :func:`cache_info` (one line for an unfinished build)."""
    if not info["complete"]:
        return _INCOMPLETE_INFO.format_map(info)
    width = max((len(name) for name in info["components"]), default=0)
    components = (f"    {name:<{width}}  {short(v)}" for name, v in info["components"].items())
    return "\n".join([_INFO.format_map(info), *components])
