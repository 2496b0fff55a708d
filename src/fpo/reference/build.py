"""Building the offline cache as a Lightning predict loop (it shards across devices).

Values come from the online reference's own code, ``OnlineReference.stats(...,
features=k > 0, token_kl=False)``, so a cached value equals the online one. Per split::

    every rank: open its ReferenceCacheWriter; barrier
    every rank: todo = pairs in no completed shard (the same list everywhere); barrier
    batch b of todo is computed and written by rank b % world_size
    every rank: writer.close() (abort() on an error); barrier; rank 0: writer.finalize()

An interrupted build resumes where it stopped (done pairs are skipped). Dealing whole
batches keeps them, hence their padding, the same for any number of ranks, and a resumed
build's too (shards end on batch boundaries): the values are then bit-identical.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fpo.errors import UserError
from fpo.logprobs import response_positions
from fpo.reference.base import OnlineReference
from fpo.reference.settings import CacheSettings
from fpo.reference.store import ReferenceCache, completed_ids
from fpo.reference.writer import ReferenceCacheWriter

log = logging.getLogger("fpo.cache")


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


class PairBatches(Dataset):
    """Item ``i`` is the collated batch of the pairs ``batches[i]`` (load it with
    ``batch_size=None``), so the batches are exactly the ones dealt to this rank."""

    def __init__(self, dataset: Any, batches: list[list[int]], collate: Callable) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.collate([self.dataset[i] for i in self.batches[index]])


class CachePredictor(L.LightningModule):
    """The frozen reference in a predict loop; each batch's rows go to its split's writer,
    opened by ``new_writer(path, components, rank=, world_size=)``."""

    def __init__(
        self,
        reference: OnlineReference,
        builds: list[SplitBuild],
        new_writer: Callable,
        collate: Callable,
        batch_size: int,
    ) -> None:
        super().__init__()
        self.reference, self.builds, self.new_writer = reference, builds, new_writer
        self.collate, self.batch_size = collate, batch_size

    def setup(self, stage: str) -> None:
        """Open the writers, then agree on the remaining pairs and deal out their batches."""
        rank, world, size = self.trainer.global_rank, self.trainer.world_size, self.batch_size
        for build in self.builds:
            build.writer = self.new_writer(
                build.path, build.components, rank=rank, world_size=world
            )
        self.trainer.strategy.barrier("fpo-cache-writers-open")
        for build in self.builds:
            done = completed_ids(build.path)
            todo = [i for i, key in enumerate(build.dataset.example_ids) if key not in done]
            build.batches = [todo[s : s + size] for s in range(0, len(todo), size)][rank::world]
            build.computed = len(todo)
        self.trainer.strategy.barrier("fpo-cache-todo-listed")
        self.to_run = [build for build in self.builds if build.batches]

    def predict_dataloader(self) -> list[DataLoader]:
        loaders = [PairBatches(b.dataset, b.batches, self.collate) for b in self.to_run]
        return [DataLoader(batches, batch_size=None) for batches in loaders]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Reference statistics ``[2B]``/``[2B, k]``, written as B rows (chosen, rejected)."""
        positions, features = response_positions(batch["labels"]), self.reference.k > 0
        stats = self.reference.stats(batch, positions, features=features, token_kl=False)
        fields = dict(zip(("sum_logps", "avg_logps", "n_tokens"), stats.logps, strict=True))
        if features:
            fields |= {"topk_indices": stats.topk_indices, "topk_values": stats.topk_values}
        halves = {name: value.cpu().chunk(2) for name, value in fields.items()}
        chosen, rejected = ({name: pair[i] for name, pair in halves.items()} for i in (0, 1))
        self.to_run[dataloader_idx].writer.add(batch["example_id"], chosen, rejected)


def is_complete(path: Path, components: dict[str, str]) -> bool:
    """Whether ``path`` holds a finished, intact cache with exactly these components."""
    try:
        ReferenceCache.open(path, components)
    except UserError:  # missing, incomplete, other inputs, damaged: the writer decides
        return False
    return True


def build_reference_cache(
    make_trainer: Callable[[list], L.Trainer],
    policy: nn.Module,
    sae: nn.Module | None,
    datamodule: Any,
    settings: CacheSettings,
    *,
    batch_size: int,
    shard_size: int = 1024,
    overwrite: bool = False,
    logits_chunk_size: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Build (or resume, or keep) the cache of every split of ``datamodule``.

    Args:
        make_trainer: ``callbacks -> Trainer`` (built only when something is left to do);
            it must pass ``use_distributed_sampler=False`` (batches are dealt out here).
        policy, sae: the reference model (the initial policy) and the SAE (``k > 0``).
        datamodule: a ``PreferenceDataModule`` with its tokenizer set.
        batch_size: pairs per predict batch; ``shard_size``: rows per shard (at least).

    Returns:
        ``{split: {"manifest": ..., "computed": pairs computed now, "seconds": ...}}`` on
        global rank 0 (other ranks: ``{}``). Splits already complete are kept as they are.
    """
    fingerprints, builds = settings.model_fingerprints(policy, sae), []
    for split in datamodule.splits:
        path, components = (
            settings.split_path(split),
            settings.components(datamodule, split, fingerprints),
        )
        if not overwrite and is_complete(path, components):
            log.info("reference cache %s is complete and up to date; kept", path)
        else:
            builds.append(
                SplitBuild(split, path, datamodule.dataset(split, wrapped=False), components)
            )
    if not builds:
        return {}
    sae = sae if settings.k > 0 else None
    reference = OnlineReference(policy, sae, settings.hook_name, settings.k, logits_chunk_size)
    new_writer = partial(
        ReferenceCacheWriter,
        k=settings.k,
        values_dtype=settings.values_dtype,
        shard_size=shard_size,
        overwrite=overwrite,
    )
    predictor = CachePredictor(reference, builds, new_writer, datamodule.collator, batch_size)
    trainer, started = make_trainer([]), time.perf_counter()
    try:
        with warnings.catch_warnings():  # pre-batched loaders: Lightning needs no indices
            warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
            trainer.predict(predictor, return_predictions=False)
    except BaseException:
        for build in builds:
            if build.writer is not None:
                build.writer.abort()
        raise
    for build in builds:
        build.writer.close()
    trainer.strategy.barrier("fpo-cache-closed")
    seconds, results = time.perf_counter() - started, {}
    for build in builds if trainer.is_global_zero else ():
        manifest = build.writer.finalize(build.dataset.example_ids)
        results[build.split] = {
            "manifest": manifest,
            "computed": build.computed,
            "seconds": seconds,
        }
    trainer.strategy.barrier("fpo-cache-finalized")
    return results
