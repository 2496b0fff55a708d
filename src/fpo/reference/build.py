"""Building the offline cache as a Lightning predict loop (it shards across devices).

The values are computed by the same code as the online reference,
``OnlineReference.stats(batch, positions, features=k > 0, token_kl=False)``, so a cached
value equals the online one by construction. Per split (one cache folder each)::

    every rank: writer = ReferenceCacheWriter(path, components, k, dtype, rank, world)
    barrier; todo = pairs not in any completed shard (the same list on every rank)
    barrier; batches of todo, batch b computed by rank b % world
    predict loop -> CacheRowWriter (a BasePredictionWriter) -> writer.add
    every rank: writer.close(); barrier; rank 0: finalize (writes manifest.json last)

Resuming: pairs already in a completed shard are skipped before the loaders are built, so
an interrupted build continues where it stopped. Dealing whole batches round-robin keeps
the batches (hence their padding) identical for any number of ranks, and for a resumed
build whose shards end on batch boundaries: the values are then bit-identical.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from fpo.errors import UserError
from fpo.logprobs import response_positions
from fpo.reference.base import OnlineReference, ReferenceStats
from fpo.reference.layout import completed_ids
from fpo.reference.reader import ReferenceCache
from fpo.reference.settings import CacheSettings
from fpo.reference.writer import ReferenceCacheWriter, finalize

log = logging.getLogger("fpo.cache")


# ------------------------------------------------------------------------- the model
def cache_rows(example_ids: Sequence[str], stats: ReferenceStats) -> dict[str, Any]:
    """Split ``[2B]``/``[2B, k]`` reference statistics into the writer's per-side fields.

    Returns ``{"example_id": [B ids], "chosen": {...}, "rejected": {...}}`` with fields
    ``sum_logps``, ``avg_logps``, ``n_tokens`` ``[B]`` and, with features, ``topk_indices``,
    ``topk_values`` ``[B, k]`` (CPU tensors).
    """
    fields: dict[str, Tensor] = {
        "sum_logps": stats.logps.sum,
        "avg_logps": stats.logps.avg,
        "n_tokens": stats.logps.n_tokens,
    }
    if stats.topk_indices is not None:
        fields |= {"topk_indices": stats.topk_indices, "topk_values": stats.topk_values}
    sides: dict[str, dict[str, Tensor]] = {"chosen": {}, "rejected": {}}
    for name, value in fields.items():
        sides["chosen"][name], sides["rejected"][name] = (h.cpu() for h in value.chunk(2))
    return {"example_id": list(example_ids), **sides}


class ReferencePredictor(L.LightningModule):
    """The cache builder's model: the frozen reference, run in a predict loop."""

    def __init__(self, reference: OnlineReference) -> None:
        super().__init__()
        self.reference = reference

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        positions = response_positions(batch["labels"])
        features = self.reference.k > 0
        stats = self.reference.stats(batch, positions, features=features, token_kl=False)
        return cache_rows(batch["example_id"], stats)


# -------------------------------------------------------------------- data + writers
@dataclass
class SplitBuild:
    """One split to (re)build: its folder, pairs, fingerprint, and this rank's share."""

    split: str
    path: Path
    dataset: Any  # PreferenceDataset: items with example_id, indexable
    components: dict[str, str]
    writer: ReferenceCacheWriter | None = None
    batches: list[list[int]] = field(default_factory=list)
    computed: int = 0


class PairBatches(Dataset):
    """Item ``i`` is the collated batch of the pairs ``batches[i]`` (pre-batched: load it
    with ``batch_size=None``), so the batches are exactly the ones dealt to this rank."""

    def __init__(self, dataset: Any, batches: list[list[int]], collate: Callable) -> None:
        self.dataset, self.batches, self.collate = dataset, batches, collate

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.collate([self.dataset[i] for i in self.batches[index]])


class PendingPairs(L.LightningDataModule):
    """The pairs this rank still has to compute: one predict loader per unfinished split."""

    def __init__(
        self,
        builds: list[SplitBuild],
        settings: CacheSettings,
        collate: Callable,
        batch_size: int,
        shard_size: int,
        overwrite: bool,
    ) -> None:
        super().__init__()
        self.builds, self.settings, self.collate = builds, settings, collate
        self.batch_size, self.shard_size, self.overwrite = batch_size, shard_size, overwrite
        self.loader_builds: list[SplitBuild] = []

    def setup(self, stage: str) -> None:
        """Open the writers, then agree on the remaining pairs and deal out their batches."""
        rank, world = self.trainer.global_rank, self.trainer.world_size
        for build in self.builds:
            build.writer = ReferenceCacheWriter(
                build.path,
                build.components,
                self.settings.k,
                self.settings.values_dtype,
                rank=rank,
                world_size=world,
                shard_size=self.shard_size,
                overwrite=self.overwrite,
            )
        self.trainer.strategy.barrier("fpo-cache-writers-open")
        for build in self.builds:
            done = completed_ids(build.path, world)
            ids = build.dataset.example_ids
            todo = [i for i, example_id in enumerate(ids) if example_id not in done]
            batches = [todo[s : s + self.batch_size] for s in range(0, len(todo), self.batch_size)]
            build.batches = batches[rank::world]
            build.computed = len(todo)
        self.trainer.strategy.barrier("fpo-cache-todo-listed")

    def predict_dataloader(self) -> list[DataLoader]:
        self.loader_builds = [build for build in self.builds if build.batches]
        return [
            DataLoader(PairBatches(build.dataset, build.batches, self.collate), batch_size=None)
            for build in self.loader_builds
        ]

    def close(self) -> None:
        for build in self.builds:
            build.writer.close()


class CacheRowWriter(BasePredictionWriter):
    """Hands each predicted batch to its split's writer; on a crash keeps finished rows."""

    def __init__(self, pending: PendingPairs) -> None:
        super().__init__(write_interval="batch")
        self.pending = pending

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: dict,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        writer = self.pending.loader_builds[dataloader_idx].writer
        writer.add(prediction["example_id"], prediction["chosen"], prediction["rejected"])

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        for build in self.pending.builds:
            if build.writer is not None:  # flush finished rows, leave the rank unfinished
                build.writer.__exit__(type(exception), exception, None)


# ----------------------------------------------------------------------- the build
def is_complete(path: Path, components: dict[str, str]) -> bool:
    """Whether ``path`` holds a finished, intact cache with exactly these components."""
    try:
        ReferenceCache.open(path, components, verify=False)
    except UserError:  # missing, incomplete, other inputs, damaged: the writer decides
        return False
    return True


def build_reference_cache(
    make_trainer: Callable[[list[Callback]], L.Trainer],
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
        batch_size: pairs per predict batch.

    Returns:
        ``{split: {"manifest": ..., "computed": pairs computed now, "seconds": ...}}`` on
        global rank 0 (other ranks: ``{}``). Splits already complete are kept as they are.
    """
    fingerprints = settings.model_fingerprints(policy, sae)
    builds = []
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
    reference = OnlineReference(
        policy,
        sae=sae,
        hook_name=settings.hook_name,
        k=settings.k,
        logits_chunk_size=logits_chunk_size,
    )
    pending = PendingPairs(builds, settings, datamodule.collator, batch_size, shard_size, overwrite)
    trainer = make_trainer([CacheRowWriter(pending)])
    started = time.perf_counter()
    with warnings.catch_warnings():  # pre-batched loaders: Lightning needs no indices
        warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
        trainer.predict(ReferencePredictor(reference), datamodule=pending, return_predictions=False)
    pending.close()
    trainer.strategy.barrier("fpo-cache-closed")
    seconds = time.perf_counter() - started
    results = {}
    if trainer.is_global_zero:
        for build in builds:
            manifest = finalize(build.path, trainer.world_size, build.dataset.example_ids)
            results[build.split] = {
                "manifest": manifest,
                "computed": build.computed,
                "seconds": seconds,
            }
    trainer.strategy.barrier("fpo-cache-finalized")
    return results
