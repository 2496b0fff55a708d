"""Building the offline cache: per-rank shards (atomic, resumable), then one manifest.

Values come from the online reference's own code, ``OnlineReference.stats(...,
features=k > 0, token_kl=False)``, run in a Lightning predict loop that shards across
devices like training, so a cached value equals the online one. Per split::

    every rank: open its ReferenceCacheWriter; barrier
    every rank: todo = pairs in no completed shard (the same list everywhere); barrier
    batch b of todo is computed and written by rank b % world_size
    every rank: writer.close() (abort() on an error); barrier; rank 0: writer.finalize()

An interrupted build resumes where it stopped (done pairs are skipped). Dealing whole
batches keeps them, hence their padding, the same for any number of ranks, and a resumed
build's too (shards end on batch boundaries): the values are then bit-identical.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import torch
from torch.utils.data import DataLoader

from fpo.atomic import atomic_save_bytes
from fpo.cache_checksums import remove_changed_shards, shard_entry
from fpo.errors import UserError
from fpo.logprobs import response_positions
from fpo.reference import store
from fpo.reference.base import OnlineReference
from fpo.reference.settings import CacheSettings, differences, normalize_values_dtype

log = logging.getLogger("fpo.cache")
_SHARD = re.compile(r"\.?rank(\d+)-(\d+)\.arrow")  # a shard or its temp file


def atomic_write(path: Path, data: bytes | pa.Buffer) -> None:
    """Write ``data`` to ``path`` atomically (``fpo.atomic``: a failed write leaves no temp
    file; a full disk is a UserError naming the file)."""
    atomic_save_bytes(path, lambda f: f.write(data))


class ReferenceCacheWriter:
    """Writes rank ``rank``'s rows of a cache into ``path``, a shard per ``shard_size`` rows
    or more (shards end on ``add`` boundaries, so a resumed build keeps its batches). Every
    rank calls ``close()`` (``abort()`` after an error), then rank 0 ``finalize()``.

    The fingerprint is ``components`` with ``k`` and ``dtype`` set from the arguments. A
    folder holding a manifest or shards of another fingerprint is refused, each differing
    component named, unless ``overwrite``: then each rank removes its share of the old files
    (of ranks equal to ``rank`` modulo ``world_size``; rank 0 also the manifest). Completed
    shards of every rank are kept, so an interrupted build resumes; those whose bytes differ
    from a finished cache's manifest are removed, so their pairs are computed again."""

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
        self.types = store.field_types(self.k, self.values_dtype)
        self.fingerprint = {name: str(value) for name, value in components.items()}
        self.fingerprint |= {"k": str(self.k), "dtype": self.values_dtype}
        self.schema = store.cache_schema(self.k, self.values_dtype, self.fingerprint)
        (self.path / "shards").mkdir(parents=True, exist_ok=True)
        if overwrite:  # this rank's share of the old files
            for file in (self.path / "shards").iterdir():
                if self._mine(file.name):
                    file.unlink()
            if rank == 0:
                (self.path / store.MANIFEST).unlink(missing_ok=True)
        else:
            self._refuse_other_fingerprints()  # then recompute changed shards, never bless them
            if (self.path / store.MANIFEST).is_file():
                remove_changed_shards(self.path, store.read_manifest(self.path), self._mine)
        mine = (self.path / "shards").glob(f"rank{rank}-*.arrow")
        self._next = 1 + max((int(file.stem.split("-")[1]) for file in mine), default=-1)
        self._pending, self._closed = [], False

    def _mine(self, name: str) -> bool:
        """Whether a shard (or its temp file) is this rank's share: of ranks equal to ours
        modulo the world size."""
        return bool((match := _SHARD.match(name)) and int(match[1]) % self.world_size == self.rank)

    def _refuse_other_fingerprints(self) -> None:
        found = []
        if (self.path / store.MANIFEST).is_file():
            found.append((self.path / store.MANIFEST, store.read_manifest(self.path)["components"]))
        found += [(file, store.shard_fingerprint(table)) for file, table in store.shards(self.path)]
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
        ``[B]`` and, with ``k > 0``, ``topk_indices``, ``topk_values`` ``[B, k]``; each
        must be finite in its stored dtype (float16 may overflow), ``n_tokens >= 1``."""
        if self._closed:
            raise RuntimeError("add() after close()")
        ids = [str(i) for i in example_ids]
        arrays = [pa.array(ids, pa.string())]
        for side, fields in zip(store.SIDES, (chosen, rejected), strict=True):
            for name, dtype in self.types.items():
                value = torch.as_tensor(fields[name]).detach().cpu().to(getattr(torch, dtype))
                topk = name.startswith("topk")
                shape = (len(ids), self.k) if topk else (len(ids),)
                if (got := tuple(value.shape)) != shape:
                    raise ValueError(f"{side}_{name} has shape {got}, expected {shape}")
                if (bad := value < 1 if name == "n_tokens" else ~value.isfinite()).any():
                    raise UserError(
                        f"{side}_{name} of example id {ids[bad.nonzero()[0, 0]]!r} is not valid "
                        f"as {dtype} (not finite, or no tokens); if float16 overflows, use "
                        "values_dtype=float32."
                    )
                column = pa.array(value.reshape(-1).numpy())
                arrays.append(pa.FixedSizeListArray.from_arrays(column, self.k) if topk else column)
        self._pending.append(pa.record_batch(arrays, schema=self.schema))
        if sum(batch.num_rows for batch in self._pending) >= self.shard_size:
            self._write_shard()

    def close(self) -> None:
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
        for file, table in store.shards(self.path):
            ids.update(table.column("example_id").to_pylist())
            entries.append(shard_entry(self.path, file, table.num_rows))
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
        atomic_write(self.path / store.MANIFEST, json.dumps(manifest, indent=1).encode())
        return manifest

    def _write_shard(self) -> None:
        if not self._pending:
            return
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, self.schema) as ipc:
            ipc.write_table(pa.Table.from_batches(self._pending).combine_chunks())
        name = f"rank{self.rank}-{self._next:05d}.arrow"
        atomic_write(self.path / "shards" / name, sink.getvalue())
        self._pending, self._next = [], self._next + 1


@dataclass
class SplitBuild:
    """One split to (re)build: its folder, pairs, fingerprint, and this rank's share."""

    split: str
    path: Path
    dataset: Any  # PreferenceDataset: items with example_id, and .example_ids
    components: dict[str, str]
    writer: ReferenceCacheWriter | None = None
    batches: list[list[int]] = field(default_factory=list)
    computed: int = 0


class CachePredictor(L.LightningModule):
    """The frozen reference in a predict loop; each batch's rows go to its split's writer."""

    def __init__(self, reference, builds, collate, batch_size: int, writer_kwargs: dict) -> None:
        super().__init__()
        self.reference, self.builds, self.writer_kwargs = reference, builds, writer_kwargs
        self.collate, self.batch_size = collate, batch_size

    def setup(self, stage: str) -> None:
        """Open the writers, then agree on the remaining pairs and deal out their batches."""
        rank, world, size = self.trainer.global_rank, self.trainer.world_size, self.batch_size
        kwargs = self.writer_kwargs | {"rank": rank, "world_size": world}
        for build in self.builds:
            build.writer = ReferenceCacheWriter(build.path, build.components, **kwargs)
        self.trainer.strategy.barrier("fpo-cache-writers-open")
        for build in self.builds:
            done = store.completed_ids(build.path)
            todo = [i for i, key in enumerate(build.dataset.example_ids) if key not in done]
            build.batches = [todo[s : s + size] for s in range(0, len(todo), size)][rank::world]
            build.computed = len(todo)
        self.trainer.strategy.barrier("fpo-cache-todo-listed")
        self.to_run = [build for build in self.builds if build.batches]

    def predict_dataloader(self) -> list[DataLoader]:
        """A loader per split whose item ``i`` is this rank's collated batch ``i``."""
        return [
            DataLoader(b.batches, None, collate_fn=partial(self.collate_pairs, b.dataset))
            for b in self.to_run
        ]

    def collate_pairs(self, dataset: Any, pairs: list[int]) -> dict[str, Any]:
        return self.collate([dataset[i] for i in pairs])

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Reference statistics ``[2B]``/``[2B, k]``, written as B rows (chosen, rejected)."""
        positions, features = response_positions(batch["labels"]), self.reference.k > 0
        stats = self.reference.stats(batch, positions, features=features, token_kl=False)
        rows = store.cache_rows(stats)
        self.to_run[dataloader_idx].writer.add(batch["example_id"], *rows.values())


def is_complete(path: Path, components: dict[str, str]) -> bool:
    """Whether ``path`` holds a finished, intact cache with exactly these components."""
    try:
        store.ReferenceCache.open(path, components)
    except UserError:  # missing, incomplete, other inputs, damaged: the writer decides
        return False
    return True


def build_reference_cache(
    make_trainer: Callable[[list], L.Trainer],
    reference: OnlineReference,
    datamodule: Any,
    settings: CacheSettings,
    *,
    batch_size: int,
    shard_size: int = 1024,
    overwrite: bool = False,
) -> dict[str, dict[str, Any]]:
    """Build (or resume, or keep as they are if complete) the caches of every split of
    ``datamodule`` (a ``PreferenceDataModule``) with ``reference`` (``fpo.builder``'s: the
    initial policy, and the SAE when ``settings.k > 0``); ``batch_size`` pairs per predict
    batch, at least ``shard_size`` rows per shard. ``make_trainer``: ``callbacks ->
    Trainer``, built only if there is work, ``use_distributed_sampler=False``.

    Returns ``{split: {"manifest", "computed": pairs computed now, "seconds"}}`` of the
    splits built, on global rank 0 (other ranks: ``{}``)."""
    if reference.k != settings.k:
        raise ValueError(f"the reference keeps k={reference.k} features, the cache {settings.k}")
    fingerprints, builds = settings.model_fingerprints(reference.model, reference.sae), []
    for split in datamodule.splits:
        path = settings.split_path(split)
        components = settings.components(datamodule, split, fingerprints)
        if not overwrite and is_complete(path, components):
            log.info("reference cache %s is complete and up to date; kept", path)
            continue
        dataset = datamodule.dataset(split, wrapped=False)
        builds.append(SplitBuild(split, path, dataset, components))
    if not builds:
        return {}
    writer_kwargs = {"k": settings.k, "values_dtype": settings.values_dtype}
    writer_kwargs |= {"shard_size": shard_size, "overwrite": overwrite}
    predictor = CachePredictor(reference, builds, datamodule.collator, batch_size, writer_kwargs)
    trainer, started = make_trainer([]), time.perf_counter()
    try:
        with warnings.catch_warnings():  # pre-batched loaders: Lightning needs no indices
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            trainer.predict(predictor, return_predictions=False)
    except BaseException:
        for writer in (build.writer for build in builds if build.writer is not None):
            writer.abort()
        raise
    for build in builds:
        build.writer.close()
    trainer.strategy.barrier("fpo-cache-closed")
    seconds, results = time.perf_counter() - started, {}
    for build in builds if trainer.is_global_zero else ():
        manifest = build.writer.finalize(build.dataset.example_ids)
        results[build.split] = dict(manifest=manifest, computed=build.computed, seconds=seconds)
    trainer.strategy.barrier("fpo-cache-finalized")
    return results
