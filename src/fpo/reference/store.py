"""Storage of the offline reference cache: atomic, resumable, verified, memory-mapped.

Per preference pair (key: the stable string ``example_id``) the cache holds the reference's
``sum_logps``, ``avg_logps`` (float32) and ``n_tokens`` (int32) for chosen and rejected, and
its pooled SAE features as top-k ``topk_indices`` (int32 ``[k]``) / ``topk_values``
(float16 or float32 ``[k]``); with ``k = 0`` (a DPO-only cache) the top-k columns are absent.

Layout of a cache folder ``PATH``::

    PATH/shards/rank{r}-{n:05d}.arrow   Arrow IPC files, one record batch each, written
                                        only by rank r, each atomically (temp name in the
                                        same folder, fsync, os.replace)
    PATH/parts/rank{r}.json             rank r's part-manifest, written by its close():
                                        its shards with byte sizes and sha256
    PATH/manifest.json                  written LAST, atomically, by finalize() on rank 0;
                                        without it the cache is incomplete and never loaded

Why Arrow IPC rather than safetensors: the key is a string id, which Arrow stores natively
next to the numbers in the same file (safetensors holds tensors only and would need a side
file to map rows to ids); fixed-size-list columns carry the ``[k]`` arrays; a whole shard
is one self-describing file whose schema metadata records the fingerprint, so even a
partial build can be checked; and ``pa.memory_map`` + ``pa.ipc.open_file`` give zero-copy
numpy views, so loading costs page faults, not reads.

Every shard carries the fingerprint *components* (see :mod:`fpo.reference.fingerprint`),
``k`` and ``values_dtype``; a writer refuses a folder holding state with other ones, a
reader refuses a manifest whose components differ from the expected ones, and names them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fpo.errors import UserError
from fpo.reference.fingerprint import compare_fingerprints, library_versions, short

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")
SCALARS = {"sum_logps": np.float32, "avg_logps": np.float32, "n_tokens": np.int32}
VALUES_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_META_KEY = b"fpo.reference"
_SHARD_RE = re.compile(r"rank(\d+)-(\d{5})\.arrow")
ArrayLike = np.ndarray | torch.Tensor


# ------------------------------------------------------------------------- small helpers
def normalize_values_dtype(name: str) -> str:
    """``"float16"`` or ``"float32"`` (aliases fp16/half/fp32/float accepted)."""
    name = _DTYPE_ALIASES.get(str(name).lower(), str(name).lower())
    if name not in VALUES_DTYPES:
        raise UserError(f"values_dtype must be float16 or float32 for the cache, got {name!r}.")
    return name


def cache_schema(k: int, values_dtype: str, state: Mapping[str, Any] | None = None) -> pa.Schema:
    """Arrow schema of a shard; ``state`` (components, k, dtype) goes into its metadata."""
    fields = [pa.field("example_id", pa.string(), nullable=False)]
    for side in SIDES:
        fields += [
            pa.field(f"{side}_{name}", pa.from_numpy_dtype(t), nullable=False)
            for name, t in SCALARS.items()
        ]
        if k > 0:
            value_type = VALUES_DTYPES[values_dtype]
            fields.append(pa.field(f"{side}_topk_indices", pa.list_(pa.int32(), k), False))
            fields.append(pa.field(f"{side}_topk_values", pa.list_(value_type, k), False))
    metadata = {_META_KEY: json.dumps(state, sort_keys=True)} if state else None
    return pa.schema(fields, metadata=metadata)


def _atomic_write(path: Path, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to ``path`` atomically: temp name in the same folder, fsync, replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path}: {err}. The cache folder is corrupt.") from err


def _shard_state(path: Path) -> dict[str, Any]:
    """The fingerprint state recorded in a shard's schema metadata."""
    try:
        schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
        return json.loads(schema.metadata[_META_KEY])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"Shard {path} cannot be read ({err}): it is corrupt. Delete it to recompute its "
            "rows, or rebuild with overwrite=True."
        ) from err


def _component_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> list[str]:
    """One message line per differing component: ``name: expected <short>, found <short>``."""
    return [
        f"  {name}: expected {short(expected.get(name))}, found {short(found.get(name))}"
        for name in compare_fingerprints(expected, found)
    ]


def _state_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """Lines naming every differing component, plus k / values_dtype ('' when all equal)."""
    lines = _component_differences(expected["components"], found["components"])
    for key in ("k", "values_dtype"):
        if expected[key] != found[key] and key not in compare_fingerprints(
            expected["components"], found["components"]
        ):
            lines.append(f"  {key}: expected {expected[key]}, found {found[key]}")
    return "\n".join(lines)


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
            doomed += [self.path / MANIFEST, *_orphans(self.path, self.world_size)]
        for file in doomed:
            file.unlink(missing_ok=True)

    def _check_compatible(self) -> None:
        """Refuse a folder whose existing (partial or complete) state has another fingerprint."""
        sources = [self.path / MANIFEST, *sorted((self.path / "parts").glob("rank*.json"))]
        for source in sources:
            if source.exists():
                self._refuse_if_different(source, _read_json(source))
        for shard in sorted((self.path / "shards").glob("rank*-*.arrow")):
            self._refuse_if_different(shard, _shard_state(shard))

    def _refuse_if_different(self, source: Path, found: Mapping[str, Any]) -> None:
        differences = _state_differences(self.state, found)
        if differences:
            raise UserError(
                f"Refusing to write the reference cache into {self.path}: it already holds "
                f"cache state ({source.name}) built with other inputs. Differing components "
                f"(expected = this build):\n{differences}\nUse another folder, or pass "
                "overwrite=True to replace it."
            )

    def _load_own_shards(self) -> None:
        for tmp in (self.path / "shards").glob(f".rank{self.rank}-*.tmp-*"):
            tmp.unlink(missing_ok=True)  # a temp file is never a completed shard
        self._next = 0
        for shard in self._own_shards():
            ids = _shard_ids(shard)
            self._ids.update(ids)
            self._record_shard(shard, shard.stat().st_size, _sha256_file(shard), len(ids))
            self._next = max(self._next, _shard_rank_and_number(shard)[1] + 1)

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
        _atomic_write(previous, json.dumps(part, indent=1).encode())
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
        _atomic_write(shard, data)
        rows = len(columns["example_id"])
        self._record_shard(shard, data.size, hashlib.sha256(data).hexdigest(), rows)
        self._next += 1


def _shard_rank_and_number(shard: Path) -> tuple[int, int]:
    match = _SHARD_RE.fullmatch(shard.name)
    return (int(match[1]), int(match[2])) if match else (-1, -1)


def _shard_ids(shard: Path) -> list[str]:
    """All example ids of a shard file (UserError naming it when unreadable)."""
    _shard_state(shard)
    reader = pa.ipc.open_file(pa.memory_map(str(shard)))
    batches = (reader.get_batch(b) for b in range(reader.num_record_batches))
    return [i for batch in batches for i in batch.column("example_id").to_pylist()]


def _orphans(path: Path, world_size: int) -> list[Path]:
    """Shards and part-manifests of ranks >= world_size (left by a wider earlier build)."""
    shards = (path / "shards").glob("rank*-*.arrow")
    shards = [s for s in shards if _shard_rank_and_number(s)[0] >= world_size]
    parts = [p for p in (path / "parts").glob("rank*.json") if int(p.stem[4:]) >= world_size]
    return shards + parts


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
        parts.append(_read_json(part_file))
    for rank, part in enumerate(parts):
        differences = _state_differences(parts[0], part)
        if differences:
            raise UserError(f"Rank {rank} of {path} used other inputs than rank 0:\n{differences}")
    shards = [shard for part in parts for shard in part["shards"]]
    ids: set[str] = set()
    for shard in shards:
        _check_shard(path, shard, verify=False, rebuild_command="the same build command")
        ids.update(_shard_ids(path / shard["file"]))
    for orphan in _orphans(path, world_size):
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
    _atomic_write(path / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _check_shard(path: Path, shard: Mapping[str, Any], verify: bool, rebuild_command: str) -> None:
    """Existence, byte size and (with ``verify``) sha256 of one manifest shard entry."""
    file = path / shard["file"]
    problem = None
    if not file.is_file():
        problem = "is missing"
    elif (size := file.stat().st_size) != shard["bytes"]:
        problem = f"has {size} bytes where the manifest records {shard['bytes']} (truncated?)"
    elif verify and _sha256_file(file) != shard["sha256"]:
        problem = "does not match its sha256 in the manifest (corrupt)"
    if problem:
        raise UserError(
            f"The reference cache at {path} is damaged: shard {file} {problem}. "
            f"Rebuild it with: {rebuild_command}"
        )


# ---------------------------------------------------------------------------- the reader
@dataclass
class _Segment:
    """One record batch of one shard, as zero-copy numpy views of its columns."""

    file: str
    columns: dict[str, np.ndarray]


class ReferenceCache:
    """A finished cache, memory-mapped, indexed by example id. Build with :meth:`open`."""

    def __init__(
        self,
        path: Path,
        manifest: dict[str, Any],
        segments: list[_Segment],
        index: dict[str, tuple[int, int]],
        rebuild_command: str,
    ) -> None:
        self.path, self.manifest, self.rebuild_command = path, manifest, rebuild_command
        self._segments, self._index = segments, index

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        expected_components: Mapping[str, Any] | None = None,
        verify: bool = True,
        rebuild_command: str = "fpo-cache ...",
    ) -> ReferenceCache:
        """Check completeness, fingerprint and integrity, then map the shards and index ids.

        Raises UserError on a missing folder, a missing manifest (interrupted build), any
        differing component (each named), a missing/truncated shard or (``verify``) a
        sha256 mismatch (the file named), and an id stored twice with different values.
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
                f"build was interrupted before finalizing (or is still running). Resume or "
                f"rebuild it with: {rebuild_command}"
            )
        manifest = _read_json(path / MANIFEST)
        if expected_components is not None:
            expected = {name: str(value) for name, value in expected_components.items()}
            differences = _component_differences(expected, manifest["components"])
            if differences:
                raise UserError(
                    f"The reference cache at {path} was built for other inputs. Differing "
                    f"components (expected = this run):\n"
                    + "\n".join(differences)
                    + f"\nRebuild it with: {rebuild_command}"
                )
        segments: list[_Segment] = []
        index: dict[str, tuple[int, int]] = {}
        for shard in manifest["shards"]:
            _check_shard(path, shard, verify, rebuild_command)
            for segment, ids in _map_shard(path / shard["file"], manifest):
                segments.append(segment)
                _index_segment(ids, segments, index, int(manifest["k"]))
        return cls(path, manifest, segments, index, rebuild_command)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._index

    def ids(self) -> Iterable[str]:
        return self._index.keys()

    def get(self, example_id: str) -> dict[str, Any]:
        """``ref_{chosen,rejected}_{sum_logps,avg_logps,n_tokens,topk_indices,topk_values}``;
        scalars as Python numbers, top-k as fresh arrays (int64 ``[k]``, float32 ``[k]``)."""
        try:
            segment, row = self._index[example_id]
        except KeyError:
            raise UserError(
                f"Example id {example_id!r} is not in the reference cache at {self.path} "
                f"({len(self)} pairs): the cache was built for other data. Rebuild it with: "
                f"{self.rebuild_command}"
            ) from None
        return _row(self._segments[segment], row, self.k)

    def __getstate__(self) -> dict[str, Any]:  # workers re-map the files instead of copying
        return {"path": self.path, "rebuild_command": self.rebuild_command}

    def __setstate__(self, state: dict[str, Any]) -> None:
        reopened = ReferenceCache.open(state["path"], None, False, state["rebuild_command"])
        self.__dict__.update(reopened.__dict__)


def _map_shard(file: Path, manifest: Mapping[str, Any]) -> list[tuple[_Segment, list[str]]]:
    """Memory-map one shard: per record batch, its numpy column views and its ids."""
    expected = cache_schema(manifest["k"], manifest["values_dtype"])
    try:
        reader = pa.ipc.open_file(pa.memory_map(str(file)))
    except (OSError, pa.ArrowException) as err:
        raise UserError(f"Shard {file} of the reference cache is unreadable: {err}") from err
    if not reader.schema.equals(expected, check_metadata=False):
        raise UserError(f"Shard {file} has columns {reader.schema.names} unlike its manifest.")
    segments = []
    for b in range(reader.num_record_batches):
        batch = reader.get_batch(b)
        columns = {}
        for field in expected:
            col = batch.column(field.name)
            if field.name == "example_id":
                continue
            if pa.types.is_fixed_size_list(field.type):
                flat = col.flatten().to_numpy(zero_copy_only=True)
                columns[field.name] = flat.reshape(len(col), field.type.list_size)
            else:
                columns[field.name] = col.to_numpy(zero_copy_only=True)
        segments.append((_Segment(file.name, columns), batch.column("example_id").to_pylist()))
    return segments


def _index_segment(
    ids: list[str], segments: list[_Segment], index: dict[str, tuple[int, int]], k: int
) -> None:
    """Add the last segment's ids to ``index``; equal duplicates are fine, unequal an error."""
    number, segment = len(segments) - 1, segments[-1]
    for row, example_id in enumerate(ids):
        if example_id in index:
            other, other_row = index[example_id]
            old, new = _row(segments[other], other_row, k), _row(segment, row, k)
            if any(not np.array_equal(old[key], new[key]) for key in old):
                raise UserError(
                    f"Example id {example_id!r} is stored twice with different values (shards "
                    f"{segments[other].file} and {segment.file}): the cache is inconsistent; "
                    "rebuild it with overwrite=True."
                )
            continue
        index[example_id] = (number, row)


def _row(segment: _Segment, row: int, k: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in SIDES:
        for name in SCALARS:
            out[f"ref_{side}_{name}"] = segment.columns[f"{side}_{name}"][row].item()
        if k > 0:
            indices = segment.columns[f"{side}_topk_indices"][row]
            values = segment.columns[f"{side}_topk_values"][row]
        else:
            indices, values = np.empty(0, np.int64), np.empty(0, np.float32)
        out[f"ref_{side}_topk_indices"] = indices.astype(np.int64)
        out[f"ref_{side}_topk_values"] = values.astype(np.float32)
    return out


# --------------------------------------------------------------------------- the dataset
class CachedReferenceDataset(torch.utils.data.Dataset):
    """``dataset[i]`` (a dict with ``example_id``) updated with the cache's ``ref_*`` fields.

    The join is by ``example_id``, never by row order, so the wrapped dataset may be
    shuffled, filtered or re-tokenized freely.
    """

    def __init__(self, dataset: Any, cache: ReferenceCache) -> None:
        self.dataset, self.cache = dataset, cache

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        if "example_id" not in example:
            raise UserError(f"Row {index} of the dataset has no 'example_id' to join the cache.")
        example.update(self.cache.get(example["example_id"]))
        return example


# ------------------------------------------------------------------------------ --info
def cache_info(path: str | os.PathLike) -> dict[str, Any]:
    """What ``fpo-cache --info PATH`` shows; an incomplete build reports its progress."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = _read_json(path / MANIFEST)
        info = {key: value for key, value in manifest.items() if key not in ("shards",)}
        return {"path": str(path), "complete": True, "num_shards": len(manifest["shards"]), **info}
    if not path.is_dir():
        raise UserError(f"No reference cache at {path}: the folder does not exist.")
    shards = sorted((path / "shards").glob("rank*-*.arrow"))
    state = _shard_state(shards[0]) if shards else {"components": {}}
    rows = sum(len(_shard_ids(shard)) for shard in shards)
    progress = {"path": str(path), "complete": False, "num_shards": len(shards), "num_rows": rows}
    return progress | state


def format_cache_info(info: Mapping[str, Any]) -> str:
    """Human-readable multi-line rendering of :func:`cache_info`."""
    status = "complete" if info["complete"] else "INCOMPLETE (no manifest.json; resume the build)"
    lines = [f"reference cache {info['path']}: {status}"]
    if info["complete"]:
        versions = ", ".join(f"{name} {v}" for name, v in info["versions"].items())
        lines += [
            f"  pairs {info['num_pairs']}, rows {info['num_rows']}, k {info['k']}, values "
            f"{info['values_dtype']}, indices {info['index_dtype']}",
            f"  size {info['total_bytes']} bytes in {info['num_shards']} shards, "
            f"{info['bytes_per_pair']:.1f} bytes per pair",
            f"  built {info['created']} in {info['build_seconds']:.1f} s on "
            f"{info['world_size']} rank(s); versions: {versions}",
        ]
    else:
        lines.append(f"  {info['num_rows']} rows written in {info['num_shards']} shards so far")
    lines.append("  components:")
    width = max((len(name) for name in info["components"]), default=0)
    lines += [f"    {name:<{width}}  {short(v)}" for name, v in info["components"].items()]
    return "\n".join(lines)
