"""On-disk layout of a reference cache folder, shared by the writer and the reader.

Layout of a cache folder ``PATH`` (one per data split)::

    PATH/shards/rank{r}-{n:05d}.arrow   Arrow IPC files, one record batch each, written
                                        only by rank r, each atomically (temp name in the
                                        same folder, fsync, os.replace)
    PATH/parts/rank{r}.json             rank r's part-manifest, written by its close():
                                        its shards with byte sizes and sha256
    PATH/manifest.json                  written LAST, atomically, by finalize() on rank 0;
                                        without it the cache is incomplete and never loaded

Columns of a shard (per pair, key: the stable string ``example_id``), for each side
``chosen``/``rejected``: ``{side}_sum_logps``, ``{side}_avg_logps`` (float32),
``{side}_n_tokens`` (int32) and, when ``k > 0``, ``{side}_topk_indices`` (int32 ``[k]``)
and ``{side}_topk_values`` (float16 or float32 ``[k]``).

Why Arrow IPC rather than safetensors: the key is a string id, which Arrow stores natively
next to the numbers in the same file (safetensors holds tensors only and would need a side
file to map rows to ids); fixed-size-list columns carry the ``[k]`` arrays; a whole shard
is one self-describing file whose schema metadata records the fingerprint *state*
(components, ``k``, ``values_dtype``), so even a partial build can be checked; and
``pa.memory_map`` + ``pa.ipc.open_file`` give zero-copy numpy views.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from fpo.errors import UserError
from fpo.reference.fingerprint import compare_fingerprints, short

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIDES = ("chosen", "rejected")
SCALARS = {"sum_logps": np.float32, "avg_logps": np.float32, "n_tokens": np.int32}
VALUES_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
_META_KEY = b"fpo.reference"
_SHARD_RE = re.compile(r"rank(\d+)-(\d{5})\.arrow")


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


# ------------------------------------------------------------------------------ files
def atomic_write(path: Path, data: bytes | pa.Buffer) -> None:
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"Cannot read {path}: {err}. The cache folder is corrupt.") from err


# ----------------------------------------------------------------------------- shards
def shard_state(path: Path) -> dict[str, Any]:
    """The fingerprint state recorded in a shard's schema metadata."""
    try:
        schema = pa.ipc.open_file(pa.memory_map(str(path))).schema
        return json.loads(schema.metadata[_META_KEY])
    except (OSError, pa.ArrowException, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"Shard {path} cannot be read ({err}): it is corrupt. Delete it to recompute its "
            "rows, or rebuild with overwrite (fpo-cache ... cache.overwrite=true)."
        ) from err


def shard_ids(shard: Path) -> list[str]:
    """All example ids of a shard file (UserError naming it when unreadable)."""
    shard_state(shard)
    reader = pa.ipc.open_file(pa.memory_map(str(shard)))
    batches = (reader.get_batch(b) for b in range(reader.num_record_batches))
    return [i for batch in batches for i in batch.column("example_id").to_pylist()]


def shard_rank_and_number(shard: Path) -> tuple[int, int]:
    match = _SHARD_RE.fullmatch(shard.name)
    return (int(match[1]), int(match[2])) if match else (-1, -1)


def rank_shards(path: Path, world_size: int) -> list[Path]:
    """Completed shards of ranks ``0..world_size-1`` (temp files are never listed)."""
    shards = sorted((path / "shards").glob("rank*-*.arrow"))
    return [s for s in shards if 0 <= shard_rank_and_number(s)[0] < world_size]


def completed_ids(path: str | os.PathLike, world_size: int) -> set[str]:
    """Ids in the completed shards of every rank of a ``world_size`` build (for resuming).

    Every rank computes the same set (from the shared folder) before writing anything, so
    all ranks agree on which pairs are left to compute.
    """
    return {i for shard in rank_shards(Path(path), world_size) for i in shard_ids(shard)}


def orphans(path: Path, world_size: int) -> list[Path]:
    """Shards and part-manifests of ranks >= world_size (left by a wider earlier build)."""
    shards = (path / "shards").glob("rank*-*.arrow")
    shards = [s for s in shards if shard_rank_and_number(s)[0] >= world_size]
    parts = [p for p in (path / "parts").glob("rank*.json") if int(p.stem[4:]) >= world_size]
    return shards + parts


def check_shard(path: Path, shard: Mapping[str, Any], verify: bool, rebuild_command: str) -> None:
    """Existence, byte size and (with ``verify``) sha256 of one manifest shard entry."""
    file = path / shard["file"]
    problem = None
    if not file.is_file():
        problem = "is missing"
    elif (size := file.stat().st_size) != shard["bytes"]:
        problem = f"has {size} bytes where the manifest records {shard['bytes']} (truncated?)"
    elif verify and sha256_file(file) != shard["sha256"]:
        problem = "does not match its sha256 in the manifest (corrupt)"
    if problem:
        raise UserError(
            f"The reference cache at {path} is damaged: shard {file} {problem}. "
            f"Rebuild it with: {rebuild_command}"
        )


# ------------------------------------------------------------------------ differences
def component_differences(
    expected: Mapping[str, Any], found: Mapping[str, Any], ignore: Iterable[str] = ()
) -> list[str]:
    """One message line per differing component: ``name: expected <short>, found <short>``."""
    ignored = set(ignore)
    return [
        f"  {name}: expected {short(expected.get(name))}, found {short(found.get(name))}"
        for name in compare_fingerprints(expected, found)
        if name not in ignored
    ]


def state_differences(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    """Lines naming every differing component, plus k / values_dtype ('' when all equal)."""
    lines = component_differences(expected["components"], found["components"])
    for key in ("k", "values_dtype"):
        if expected[key] != found[key] and key not in compare_fingerprints(
            expected["components"], found["components"]
        ):
            lines.append(f"  {key}: expected {expected[key]}, found {found[key]}")
    return "\n".join(lines)
