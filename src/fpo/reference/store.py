"""Storage of the offline reference cache: per-rank Arrow shards and a manifest written last.

A cache folder ``PATH`` (one per data split) holds ``PATH/shards/rank{r}-{n:05d}.arrow``,
Arrow IPC files each written atomically by rank r alone, their schema metadata holding the
fingerprint (so a partial build can be checked and resumed), and ``PATH/manifest.json``,
written LAST by rank 0 (fingerprint, each shard's rows and bytes): without it the cache is
incomplete and never loaded. Opening checks shard sizes and Arrow footers, no checksums.

One row per pair, keyed by the stable string ``example_id``; per side (chosen, rejected):
``sum_logps``, ``avg_logps`` (float32), ``n_tokens`` (int32) and, when ``k > 0``,
``topk_indices`` (int32 ``[k]``) and ``topk_values`` (float16 or float32 ``[k]``). Plain
Arrow rather than ``datasets``: string keys beside fixed-size ``[k]`` lists in one file,
zero-copy numpy views through ``pa.memory_map``, and per-rank atomic files are trivial.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fpo.atomic import atomic_save_bytes
from fpo.errors import UserError
from fpo.reference.settings import differences, short

MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")
#: Stored dtype of each per-side field (``topk_values``: the cache's ``values_dtype``).
FIELDS = {"sum_logps": "float32", "avg_logps": "float32", "n_tokens": "int32"}
TOPK_FIELDS = {"topk_indices": "int32", "topk_values": None}
_META = b"fpo.fingerprint"


def cache_schema(k: int, values_dtype: str, fingerprint: Mapping | None = None) -> pa.Schema:
    """Arrow schema of a shard; ``fingerprint`` goes into its metadata."""
    fields = [pa.field("example_id", pa.string())]
    for side in SIDES:
        fields += [pa.field(f"{side}_{name}", pa.type_for_alias(t)) for name, t in FIELDS.items()]
        for name, t in TOPK_FIELDS.items() if k > 0 else ():
            fields.append(
                pa.field(f"{side}_{name}", pa.list_(pa.type_for_alias(t or values_dtype), k))
            )
    return pa.schema(
        fields, metadata={_META: json.dumps(dict(fingerprint))} if fingerprint else None
    )


def atomic_write(path: Path, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to ``path`` atomically: temp name in the same folder, fsync, replace
    (a failed write leaves no temp file; a full disk is a UserError)."""
    atomic_save_bytes(path, lambda f: f.write(data))


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path / MANIFEST} ({err}): the cache is corrupt.") from err


def shard_files(path: Path) -> list[Path]:
    """The completed shards of a cache folder (temp files start with a dot: never listed)."""
    return sorted((Path(path) / "shards").glob("rank*-*.arrow"))


def open_shard(file: Path) -> pa.ipc.RecordBatchFileReader:
    """Memory-map a shard and read its Arrow footer (UserError naming it when unreadable)."""
    try:
        return pa.ipc.open_file(pa.memory_map(str(file)))
    except (OSError, pa.ArrowException) as err:
        raise UserError(
            f"Shard {file} of the reference cache cannot be read ({err}): it is truncated or "
            "corrupt. Delete it to recompute its rows, or rebuild with cache.overwrite=true."
        ) from err


def shard_fingerprint(reader: pa.ipc.RecordBatchFileReader) -> dict[str, str]:
    return json.loads((reader.schema.metadata or {}).get(_META, b"{}"))


def shard_ids(reader: pa.ipc.RecordBatchFileReader) -> list[str]:
    return reader.read_all().column("example_id").to_pylist()


def completed_ids(path: str | os.PathLike) -> set[str]:
    """Ids in the completed shards of a folder, of every rank (to skip them when resuming)."""
    return {i for file in shard_files(Path(path)) for i in shard_ids(open_shard(file))}


class ReferenceCache:
    """A finished cache, memory-mapped, indexed by example id. Build with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict, columns: list, index: dict, command: str):
        self.path, self.manifest, self.rebuild_command = path, manifest, command
        self._columns, self._index = columns, index

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_components: Mapping[str, Any] | None = None,
        rebuild_command: str = "fpo-cache ...",
        ignore_components: Iterable[str] = (),
    ) -> ReferenceCache:
        """Check completeness, fingerprint and shards, then map the shards and index the ids.

        Raises UserError on a missing folder, a missing manifest (interrupted build), any
        differing component (each named) except those in ``ignore_components``, and a
        missing, truncated or unreadable shard (the file named).
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
        manifest = read_manifest(path)
        if expected_components is not None:
            expected = {name: str(value) for name, value in expected_components.items()}
            if lines := differences(expected, manifest["components"], ignore_components):
                raise UserError(
                    f"The reference cache at {path} was built for other inputs. Differing "
                    "components (expected = this run):\n"
                    + "\n".join(lines)
                    + f"\nRebuild it with: {rebuild_command}"
                )
        schema = cache_schema(manifest["k"], manifest["values_dtype"])
        columns, index = [], {}
        for entry in manifest["shards"]:
            reader = _checked_shard(path / entry["file"], entry, schema, rebuild_command)
            for b in range(reader.num_record_batches):
                batch = reader.get_batch(b)
                columns.append({f.name: _numpy(batch.column(f.name)) for f in schema})
                for row, example_id in enumerate(columns[-1].pop("example_id")):
                    index.setdefault(example_id, (len(columns) - 1, row))
        return cls(path, manifest, columns, index, rebuild_command)

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, example_ids: Iterable[str]) -> list[str]:
        """The ids among ``example_ids`` that the cache lacks, in their order."""
        return [i for i in example_ids if i not in self._index]

    def get(self, example_id: str) -> dict[str, Any]:
        """``ref_{chosen,rejected}_{sum_logps,avg_logps,n_tokens,topk_indices,topk_values}``:
        scalars as Python numbers, top-k as int64 / float32 ``[k]`` (``[0]`` if ``k == 0``)."""
        try:
            shard, row = self._index[example_id]
        except KeyError:
            raise UserError(
                f"Example id {example_id!r} is not in the reference cache at {self.path} "
                f"({len(self)} pairs): the cache was built for other data. Rebuild it with: "
                f"{self.rebuild_command}"
            ) from None
        columns, out = self._columns[shard], {}
        for side in SIDES:
            for name in FIELDS:
                out[f"ref_{side}_{name}"] = columns[f"{side}_{name}"][row].item()
            for name, dtype in (("topk_indices", np.int64), ("topk_values", np.float32)):
                column = columns.get(f"{side}_{name}")
                out[f"ref_{side}_{name}"] = (column[row] if self.k else np.empty(0)).astype(dtype)
        return out

    def __getstate__(self) -> dict[str, Any]:  # workers re-map the files instead of copying
        return {"path": self.path, "rebuild_command": self.rebuild_command}

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopened = ReferenceCache.open(state["path"], rebuild_command=state["rebuild_command"])
        self.__dict__.update(reopened.__dict__)


def _checked_shard(
    file: Path, entry: Mapping[str, Any], schema: pa.Schema, rebuild_command: str
) -> pa.ipc.RecordBatchFileReader:
    """A manifest's shard, opened after cheap checks: it exists, has the recorded bytes,
    an Arrow footer, the columns and the rows (else UserError naming the file)."""
    size = file.stat().st_size if file.is_file() else None
    problem = f"has {size} bytes where the manifest records {entry['bytes']} (truncated?)"
    if size is None:
        problem = "is missing"
    elif size == entry["bytes"]:
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(file)))
            same = reader.schema.equals(schema, check_metadata=False)
            problem = None if same and reader.read_all().num_rows == entry["rows"] else "is stale"
        except (OSError, pa.ArrowException) as err:
            problem = f"cannot be read ({err})"
    if problem:
        raise UserError(
            f"The reference cache at {file.parent.parent} is damaged: shard {file} {problem}. "
            f"Rebuild it with: {rebuild_command}"
        )
    return reader


def _numpy(column: pa.Array) -> np.ndarray | list[str]:
    """Zero-copy numpy view of a column (``[N]``, ``[N, k]`` for lists); strings as a list."""
    if pa.types.is_string(column.type):
        return column.to_pylist()
    if pa.types.is_fixed_size_list(column.type):
        flat = column.flatten().to_numpy(zero_copy_only=True)
        return flat.reshape(len(column), column.type.list_size)
    return column.to_numpy(zero_copy_only=True)


class CachedReferenceDataset(torch.utils.data.Dataset):
    """``dataset[i]`` (a dict with ``example_id``) updated with the cache's ``ref_*`` fields:
    joined by id, never by row order, so rows may be shuffled or filtered freely."""

    def __init__(self, dataset: Any, cache: ReferenceCache) -> None:
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def example_ids(self) -> list[str]:
        return self.dataset.example_ids

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        return example | self.cache.get(example["example_id"])


def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``fpo-cache --info PATH`` shows; an incomplete build reports its progress."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        info = read_manifest(path)
        return {"path": str(path), "complete": True, "num_shards": len(info.pop("shards")), **info}
    if not path.is_dir():
        raise UserError(f"No reference cache at {path}: the folder does not exist.")
    readers = [open_shard(file) for file in shard_files(path)]
    rows = sum(len(shard_ids(reader)) for reader in readers)
    components = shard_fingerprint(readers[0]) if readers else {}
    return {
        "path": str(path),
        "complete": False,
        "num_shards": len(readers),
        "num_rows": rows,
        "components": components,
    }


def format_cache_info(info: Mapping[str, Any]) -> str:
    """Human-readable multi-line rendering of :func:`cache_info`."""
    status = "complete" if info["complete"] else "INCOMPLETE (no manifest.json; resume the build)"
    lines = [f"reference cache {info['path']}: {status}"]
    if info["complete"]:
        lines += [
            f"  pairs {info['num_pairs']}, rows {info['num_rows']}, k {info['k']}, values "
            f"{info['values_dtype']}, indices int32",
            f"  size {info['total_bytes']} bytes in {info['num_shards']} shards, "
            f"{info['bytes_per_pair']:.1f} bytes per pair",
            f"  built by {info['world_size']} rank(s)",
        ]
    else:
        lines.append(f"  {info['num_rows']} rows written in {info['num_shards']} shards so far")
    width = max((len(name) for name in info["components"]), default=0)
    lines += ["  components:"]
    lines += [f"    {name:<{width}}  {short(v)}" for name, v in info["components"].items()]
    return "\n".join(lines)
