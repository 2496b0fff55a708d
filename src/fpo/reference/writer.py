"""Writing a reference cache: per-rank shards (atomic, resumable), then one manifest.

See :mod:`fpo.reference.layout` for the folder layout. Every rank writes its own shards
with a :class:`ReferenceCacheWriter` and calls ``close()``; rank 0 then calls
:func:`finalize`, which writes ``manifest.json`` last. A writer refuses a folder holding
state (partial or complete) built with other fingerprint components, and names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fpo.errors import UserError
from fpo.reference.fingerprint import library_versions
from fpo.reference.layout import (
    FORMAT_VERSION,
    MANIFEST,
    SCALARS,
    SIDES,
    atomic_write,
    cache_schema,
    check_shard,
    normalize_values_dtype,
    orphans,
    read_json,
    sha256_file,
    shard_ids,
    shard_rank_and_number,
    shard_state,
    state_differences,
)

ArrayLike = np.ndarray | torch.Tensor


def _to_numpy(value: ArrayLike, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.float() if value.dtype == torch.bfloat16 else value
        value = value.numpy()
    value = np.asarray(value)
    if value.shape != shape:
        raise ValueError(f"reference field {name!r} has shape {value.shape}, expected {shape}")
    return value


# ---------------------------------------------------------------------------- the writer
class ReferenceCacheWriter:
    """Writes rank ``rank``'s rows of a cache into ``path`` in shards of ``shard_size`` rows.

    Resumable: shards written by an interrupted run of this rank are kept, ``done_ids()``
    lists their ids, and ``add`` drops ids already written or buffered by this rank (also
    covering the repeated samples of a ``DistributedSampler``). Call ``close()`` on every
    rank, then :func:`finalize` on rank 0. On an exception inside ``with`` the buffered rows
    are saved as a shard but no part-manifest is written.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        components: Mapping[str, Any],
        k: int,
        values_dtype: str,
        rank: int = 0,
        world_size: int = 1,
        shard_size: int = 1024,
        overwrite: bool = False,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if k < 0 or shard_size < 1:
            raise UserError(f"The cache needs k >= 0 and shard_size >= 1 (got {k}, {shard_size}).")
        self.path, self.rank, self.world_size = Path(path), rank, world_size
        self.k, self.shard_size = int(k), int(shard_size)
        self.values_dtype = normalize_values_dtype(values_dtype)
        components = {name: str(value) for name, value in components.items()}
        self.state = {"components": components, "k": self.k, "values_dtype": self.values_dtype}
        self.schema = cache_schema(self.k, self.values_dtype, self.state)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        (self.path / "parts").mkdir(exist_ok=True)
        if overwrite:
            self._remove_previous()
        else:
            self._check_compatible()
        self._shards: list[dict[str, Any]] = []
        self._ids: set[str] = set()
        self._load_own_shards()
        self._pending: list[dict[str, Any]] = []
        self._pending_ids: set[str] = set()
        self._started, self._closed = time.monotonic(), False

    # -- state on disk
    def _own_shards(self) -> list[Path]:
        return sorted((self.path / "shards").glob(f"rank{self.rank}-*.arrow"))

    def _remove_previous(self) -> None:
        """overwrite=True: each rank removes its own files; rank 0 also the manifest."""
        doomed = [*self._own_shards(), self.path / "parts" / f"rank{self.rank}.json"]
        doomed += (self.path / "shards").glob(f".rank{self.rank}-*.tmp-*")
        if self.rank == 0:  # also the manifest and the files of ranks beyond world_size
            doomed += [self.path / MANIFEST, *orphans(self.path, self.world_size)]
        for file in doomed:
            file.unlink(missing_ok=True)

    def _check_compatible(self) -> None:
        """Refuse a folder whose existing (partial or complete) state has another fingerprint."""
        sources = [self.path / MANIFEST, *sorted((self.path / "parts").glob("rank*.json"))]
        for source in sources:
            if source.exists():
                self._refuse_if_different(source, read_json(source))
        for shard in sorted((self.path / "shards").glob("rank*-*.arrow")):
            self._refuse_if_different(shard, shard_state(shard))

    def _refuse_if_different(self, source: Path, found: Mapping[str, Any]) -> None:
        differences = state_differences(self.state, found)
        if differences:
            raise UserError(
                f"Refusing to write the reference cache into {self.path}: it already holds "
                f"cache state ({source.name}) built with other inputs. Differing components "
                f"(expected = this build):\n{differences}\nUse another folder, or replace it "
                "(fpo-cache ... cache.overwrite=true; in Python overwrite=True)."
            )

    def _load_own_shards(self) -> None:
        for tmp in (self.path / "shards").glob(f".rank{self.rank}-*.tmp-*"):
            tmp.unlink(missing_ok=True)  # a temp file is never a completed shard
        self._next = 0
        for shard in self._own_shards():
            ids = shard_ids(shard)
            self._ids.update(ids)
            self._record_shard(shard, shard.stat().st_size, sha256_file(shard), len(ids))
            self._next = max(self._next, shard_rank_and_number(shard)[1] + 1)

    def _record_shard(self, shard: Path, size: int, sha256: str, rows: int) -> None:
        entry = {"file": f"shards/{shard.name}", "bytes": size, "sha256": sha256, "rows": rows}
        self._shards.append({**entry, "rank": self.rank})

    # -- public API
    def done_ids(self) -> set[str]:
        """Ids already in this rank's completed shards (skip them when resuming)."""
        return set(self._ids)

    def add(
        self,
        example_ids: list[str],
        chosen: Mapping[str, ArrayLike],
        rejected: Mapping[str, ArrayLike],
    ) -> None:
        """Buffer B rows; write every full shard. Fields per side: ``sum_logps`` [B],
        ``avg_logps`` [B], ``n_tokens`` [B], and with k > 0 ``topk_indices`` [B, k] and
        ``topk_values`` [B, k]. Ids already written or buffered by this rank are dropped."""
        if self._closed:
            raise RuntimeError("add() after close()")
        batch = self._columns(list(example_ids), chosen, rejected)
        keep, seen = [], set()
        for row, example_id in enumerate(batch["example_id"]):
            new = example_id not in self._ids and example_id not in self._pending_ids
            if new and example_id not in seen:
                keep.append(row)
                seen.add(example_id)
        if not keep:
            return
        self._pending.append({name: col[keep] for name, col in batch.items()})
        self._pending_ids |= seen
        while len(self._pending_ids) >= self.shard_size:
            self._flush(self.shard_size)

    def close(self) -> None:
        """Write the remaining rows and this rank's part-manifest (idempotent)."""
        if self._closed:
            return
        self._flush(len(self._pending_ids))
        previous = self.path / "parts" / f"rank{self.rank}.json"
        part = {
            "format_version": FORMAT_VERSION,
            **self.state,
            "rank": self.rank,
            "world_size": self.world_size,
            "versions": library_versions(),
            "build_seconds": time.monotonic() - self._started,
            "shards": self._shards,
        }
        atomic_write(previous, json.dumps(part, indent=1).encode())
        self._closed = True

    def __enter__(self) -> ReferenceCacheWriter:
        return self

    def __exit__(self, exc_type: type | None, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the finished rows for the resume, but leave the rank unfinished
            self._flush(len(self._pending_ids))
            self._closed = True

    # -- internals
    def _columns(
        self, ids: list[str], chosen: Mapping[str, ArrayLike], rejected: Mapping[str, ArrayLike]
    ) -> dict[str, Any]:
        """Validated numpy columns of one ``add`` call, in the shard schema's dtypes."""
        b, k = len(ids), self.k
        columns = {"example_id": np.array([str(i) for i in ids], dtype=object)}
        for side, fields in zip(SIDES, (chosen, rejected), strict=True):
            wanted = {name: (b,) for name in SCALARS}
            if k > 0:
                wanted |= {"topk_indices": (b, k), "topk_values": (b, k)}
            missing = sorted(set(wanted) - set(fields))
            if missing:
                raise ValueError(f"{side} reference fields missing: {missing}")
            for name, shape in wanted.items():
                columns[f"{side}_{name}"] = _to_numpy(fields[name], f"{side}_{name}", shape)
            self._validate(side, columns, ids)
        return columns

    def _validate(self, side: str, columns: dict[str, Any], ids: list[str]) -> None:
        for name, dtype in SCALARS.items():
            col = columns[f"{side}_{name}"].astype(dtype)
            bad = ~np.isfinite(col) if name != "n_tokens" else col < 1
            if bad.any():
                raise ValueError(f"{side}_{name} invalid for example id {ids[np.argmax(bad)]!r}")
            columns[f"{side}_{name}"] = col
        if self.k == 0:
            return
        columns[f"{side}_topk_indices"] = columns[f"{side}_topk_indices"].astype(np.int32)
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            values = columns[f"{side}_topk_values"].astype(self.values_dtype)
        bad = ~np.isfinite(values).all(axis=1)
        if bad.any():
            raise UserError(
                f"{side} top-k feature values of example id {ids[np.argmax(bad)]!r} are not "
                f"finite as {self.values_dtype} (overflow?); use values_dtype=float32."
            )
        columns[f"{side}_topk_values"] = values

    def _flush(self, rows: int) -> None:
        """Write the first ``rows`` pending rows as one shard (no-op for 0)."""
        if rows == 0:
            return
        names = self._pending[0]
        merged = {name: np.concatenate([part[name] for part in self._pending]) for name in names}
        head = {name: col[:rows] for name, col in merged.items()}
        rest = {name: col[rows:] for name, col in merged.items()}
        self._pending = [rest] if len(rest["example_id"]) else []
        self._write_shard(head)
        self._ids.update(head["example_id"])
        self._pending_ids.difference_update(head["example_id"])

    def _write_shard(self, columns: dict[str, Any]) -> None:
        arrays = []
        for field in self.schema:
            col = columns[field.name]
            if pa.types.is_fixed_size_list(field.type):
                flat = pa.array(col.reshape(-1), type=field.type.value_type)
                arrays.append(pa.FixedSizeListArray.from_arrays(flat, self.k))
            else:
                arrays.append(pa.array(col, type=field.type))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as ipc:
            ipc.write_batch(pa.record_batch(arrays, schema=self.schema))
        data = sink.getvalue()
        shard = self.path / "shards" / f"rank{self.rank}-{self._next:05d}.arrow"
        atomic_write(shard, data)
        rows = len(columns["example_id"])
        self._record_shard(shard, data.size, hashlib.sha256(data).hexdigest(), rows)
        self._next += 1


# ------------------------------------------------------------------------------ finalize
def finalize(
    path: str | os.PathLike, world_size: int, expected_ids: Iterable[str] | None = None
) -> dict[str, Any]:
    """Merge the ranks' part-manifests into ``manifest.json`` (rank 0, after every close()).

    With ``expected_ids`` every one of them must be in the cache. Returns the manifest.
    """
    path = Path(path)
    parts = []
    for rank in range(world_size):
        part_file = path / "parts" / f"rank{rank}.json"
        if not part_file.exists():
            raise UserError(
                f"Cannot finalize the reference cache at {path}: rank {rank} has not finished "
                f"({part_file} is missing). Resume the build with the same command."
            )
        parts.append(read_json(part_file))
    for rank, part in enumerate(parts):
        differences = state_differences(parts[0], part)
        if differences:
            raise UserError(f"Rank {rank} of {path} used other inputs than rank 0:\n{differences}")
    shards = [shard for part in parts for shard in part["shards"]]
    ids: set[str] = set()
    for shard in shards:
        check_shard(path, shard, verify=False, rebuild_command="the same build command")
        ids.update(shard_ids(path / shard["file"]))
    for orphan in orphans(path, world_size):
        warnings.warn(f"{orphan} belongs to no rank of this build; ignored.", stacklevel=2)
    if expected_ids is not None:
        missing = [i for i in expected_ids if i not in ids]
        if missing:
            raise UserError(
                f"The reference cache at {path} lacks {len(missing)} expected example ids "
                f"(first: {missing[:3]}); resume the build before finalizing."
            )
    total = sum(shard["bytes"] for shard in shards)
    manifest = {
        "format_version": FORMAT_VERSION,
        "num_pairs": len(ids),
        "num_rows": sum(shard["rows"] for shard in shards),
        "k": parts[0]["k"],
        "values_dtype": parts[0]["values_dtype"],
        "index_dtype": "int32",
        "total_bytes": total,
        "bytes_per_pair": total / max(len(ids), 1),
        "build_seconds": max(part["build_seconds"] for part in parts),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "world_size": world_size,
        "components": parts[0]["components"],
        "versions": parts[0]["versions"],
        "shards": shards,
    }
    atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest
