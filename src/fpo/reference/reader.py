"""Reading a finished reference cache: verified, memory-mapped, joined by example id.

:meth:`ReferenceCache.open` refuses a missing folder, an incomplete build (no manifest), a
manifest whose fingerprint components differ from the expected ones (each one named), and
a missing, truncated or corrupt shard (the file named). :class:`CachedReferenceDataset`
joins any dataset of ``example_id``-keyed items to it, never by row order. The layout is
described in :mod:`fpo.reference.layout`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fpo.errors import UserError
from fpo.reference.fingerprint import short
from fpo.reference.layout import (
    MANIFEST,
    SCALARS,
    SIDES,
    cache_schema,
    check_shard,
    component_differences,
    read_json,
    shard_ids,
    shard_state,
)


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
        ignore_components: Iterable[str] = (),
    ) -> ReferenceCache:
        """Check completeness, fingerprint and integrity, then map the shards and index ids.

        Raises UserError on a missing folder, a missing manifest (interrupted build), any
        differing component (each named) except those in ``ignore_components``, a
        missing/truncated shard or (``verify``) a sha256 mismatch (the file named), and an
        id stored twice with different values.
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
        manifest = read_json(path / MANIFEST)
        if expected_components is not None:
            expected = {name: str(value) for name, value in expected_components.items()}
            differences = component_differences(expected, manifest["components"], ignore_components)
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
            check_shard(path, shard, verify, rebuild_command)
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

    def missing(self, example_ids: Iterable[str]) -> list[str]:
        """The ids among ``example_ids`` that the cache lacks, in their order."""
        return [i for i in example_ids if i not in self._index]

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

    @property
    def example_ids(self) -> list[str]:
        """The wrapped dataset's ids (when it lists them)."""
        return self.dataset.example_ids

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
        manifest = read_json(path / MANIFEST)
        info = {key: value for key, value in manifest.items() if key not in ("shards",)}
        return {"path": str(path), "complete": True, "num_shards": len(manifest["shards"]), **info}
    if not path.is_dir():
        raise UserError(f"No reference cache at {path}: the folder does not exist.")
    shards = sorted((path / "shards").glob("rank*-*.arrow"))
    state = shard_state(shards[0]) if shards else {"components": {}}
    rows = sum(len(shard_ids(shard)) for shard in shards)
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
