"""Writing a reference cache: per-rank shards (atomic, resumable), then one manifest.

See :mod:`fpo.reference.store` for the folder layout. Every rank writes its own shards
with a :class:`ReferenceCacheWriter` and calls ``close()`` (``abort()`` after an error);
rank 0 then calls ``finalize()``, which writes ``manifest.json`` last.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from fpo.errors import UserError
from fpo.reference.settings import differences, normalize_values_dtype
from fpo.reference.store import (
    FIELDS,
    MANIFEST,
    SIDES,
    TOPK_FIELDS,
    atomic_write,
    cache_schema,
    open_shard,
    read_manifest,
    shard_files,
    shard_fingerprint,
    shard_ids,
)

log = logging.getLogger("fpo.cache")
_SHARD = re.compile(r"\.?rank(\d+)-(\d+)\.arrow")  # a shard or its temp file


class ReferenceCacheWriter:
    """Writes rank ``rank``'s rows of a cache into ``path``, a shard per ``shard_size`` rows
    or more (shards end on ``add`` boundaries, so a resumed build keeps its batches).

    The fingerprint is ``components`` with ``k`` and ``dtype`` set from the arguments. A
    folder holding a manifest or shards of another fingerprint is refused, each differing
    component named, unless ``overwrite``: then each rank removes its share of the old files
    (those of ranks equal to ``rank`` modulo ``world_size``; rank 0 also the manifest).
    Completed shards of every rank are kept across runs, so an interrupted build resumes.
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
        if not 0 <= rank < world_size or k < 0 or shard_size < 1:
            raise ValueError(f"bad writer arguments {rank=} {world_size=} {k=} {shard_size=}")
        self.path, self.rank, self.world_size = Path(path), rank, world_size
        self.k, self.shard_size = int(k), int(shard_size)
        self.values_dtype = normalize_values_dtype(values_dtype)
        self.fingerprint = {name: str(value) for name, value in components.items()}
        self.fingerprint |= {"k": str(self.k), "dtype": self.values_dtype}
        self.schema = cache_schema(self.k, self.values_dtype, self.fingerprint)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        if overwrite:
            self._clear_my_share()
        else:
            self._refuse_other_fingerprints()
        names = [_SHARD.match(file.name).groups() for file in shard_files(self.path)]
        self._next = max((int(n) for r, n in names if int(r) == rank), default=-1) + 1
        self._pending: list[pa.RecordBatch] = []
        self._closed = False

    def _clear_my_share(self) -> None:
        for file in (self.path / "shards").iterdir():
            match = _SHARD.match(file.name)
            if match and int(match[1]) % self.world_size == self.rank:
                file.unlink()
        if self.rank == 0:
            (self.path / MANIFEST).unlink(missing_ok=True)

    def _refuse_other_fingerprints(self) -> None:
        found = [(file, shard_fingerprint(open_shard(file))) for file in shard_files(self.path)]
        if (self.path / MANIFEST).is_file():
            found.append((self.path / MANIFEST, read_manifest(self.path)["components"]))
        for file, fingerprint in found:
            if lines := differences(self.fingerprint, fingerprint):
                raise UserError(
                    f"Refusing to write the reference cache into {self.path}: it already holds "
                    f"cache state ({file.name}) built with other inputs. Differing components "
                    "(expected = this build):\n" + "\n".join(lines) + "\nUse another folder, "
                    "or replace it (fpo-cache ... cache.overwrite=true; in Python overwrite=True)."
                )

    def add(
        self, example_ids: list[str], chosen: Mapping[str, Any], rejected: Mapping[str, Any]
    ) -> None:
        """Buffer B rows, then write a shard once ``shard_size`` rows are buffered. Fields
        per side (numpy arrays or tensors): ``sum_logps``, ``avg_logps``, ``n_tokens``
        ``[B]`` and, with ``k > 0``, ``topk_indices``, ``topk_values`` ``[B, k]``."""
        if self._closed:
            raise RuntimeError("add() after close()")
        ids = [str(i) for i in example_ids]
        arrays = [pa.array(ids, pa.string())]
        for side, fields in zip(SIDES, (chosen, rejected), strict=True):
            for name in [*FIELDS, *(TOPK_FIELDS if self.k else ())]:
                arrays.append(self._column(fields[name], side, name, ids))
        self._pending.append(pa.record_batch(arrays, schema=self.schema))
        if sum(batch.num_rows for batch in self._pending) >= self.shard_size:
            self._write_shard()

    def close(self) -> None:
        """Write the remaining rows (idempotent)."""
        if not self._closed:
            self._write_shard()
            self._closed = True

    def abort(self) -> None:
        """After an error elsewhere: save the finished rows for a resume, but never raise
        (the original error is the one to report). The cache stays incomplete."""
        try:
            self.close()
        except Exception as err:  # a failing save must not mask the original error
            log.warning("could not save the buffered rows of %s: %s", self.path, err)
        self._closed = True

    def finalize(self, expected_ids: Iterable[str] = ()) -> dict[str, Any]:
        """Rank 0, after every rank closed: write ``manifest.json`` (last) and return it.
        Every one of ``expected_ids`` must be stored."""
        entries, ids = [], set()
        for file in shard_files(self.path):
            file_ids = shard_ids(open_shard(file))
            ids.update(file_ids)
            size = file.stat().st_size
            entries.append({"file": f"shards/{file.name}", "rows": len(file_ids), "bytes": size})
        if missing := [i for i in expected_ids if i not in ids]:
            raise UserError(
                f"The reference cache at {self.path} lacks {len(missing)} expected example ids "
                f"(first: {missing[:3]}); resume the build before finalizing."
            )
        total = sum(entry["bytes"] for entry in entries)
        manifest = {"num_pairs": len(ids), "num_rows": sum(e["rows"] for e in entries)}
        manifest |= {"k": self.k, "values_dtype": self.values_dtype, "total_bytes": total}
        manifest |= {"bytes_per_pair": total / max(len(ids), 1), "world_size": self.world_size}
        manifest |= {"components": self.fingerprint, "shards": entries}
        atomic_write(self.path / MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest

    def _column(self, value: Any, side: str, name: str, ids: list[str]) -> pa.Array:
        """``value`` as an Arrow column of the stored dtype, checked: shape, finite values
        (float16 may overflow), ``n_tokens >= 1``."""
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu()
            value = value.float() if value.is_floating_point() else value
        value, shape = np.asarray(value), (len(ids), self.k) if name in TOPK_FIELDS else (len(ids),)
        if value.shape != shape:
            raise ValueError(f"{side}_{name} has shape {value.shape}, expected {shape}")
        dtype = {**FIELDS, **TOPK_FIELDS, "topk_values": self.values_dtype}[name]
        with np.errstate(over="ignore"):  # an overflow to inf is reported just below
            column = value.astype(dtype)
        bad = (column < 1 if name == "n_tokens" else ~np.isfinite(column)).reshape(len(ids), -1)
        if bad.any():
            raise UserError(
                f"{side}_{name} of example id {ids[int(np.argmax(bad.any(1)))]!r} is not valid "
                f"as {dtype} (not finite, or no tokens); if float16 overflows, use "
                "values_dtype=float32."
            )
        if name not in TOPK_FIELDS:
            return pa.array(column)
        return pa.FixedSizeListArray.from_arrays(pa.array(column.reshape(-1)), self.k)

    def _write_shard(self) -> None:
        """Write the buffered rows as one shard (nothing when none are buffered)."""
        if not self._pending:
            return
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as ipc:
            ipc.write_table(pa.Table.from_batches(self._pending).combine_chunks())
        atomic_write(
            self.path / "shards" / f"rank{self.rank}-{self._next:05d}.arrow", sink.getvalue()
        )
        self._pending, self._next = [], self._next + 1
