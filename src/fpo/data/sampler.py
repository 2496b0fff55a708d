"""Training order that does not depend on the number of devices.

Lightning's default under DDP replaces a loader's sampler by a ``DistributedSampler`` that
always shuffles the training set with its own permutation and deals items to ranks
round-robin, so two processes do not see the batches one process sees, even with the same
global batch. :class:`GlobalBatchSampler` keeps one global order for every world size:

- epoch ``e``'s order is drawn from ``seed + e`` alone (file order without a seed; epoch 0
  is the order of ``DataLoader(shuffle=True)`` with a generator seeded ``seed``), so a
  restarted process shuffles epoch ``e`` as the first one did (resuming mid-epoch,
  ``fpo.data.resumable``); Lightning calls ``set_epoch`` every epoch;
- consecutive runs of ``batch_size x world_size`` items form one step of all ranks and rank
  ``r`` takes the ``r``-th ``batch_size`` slice of each. One process with gradient
  accumulation ``a`` and ``a`` processes without see the same pairs per optimizer step.
- With ``pad`` (training) the order is padded with its first items to a multiple of the
  world size, so every rank has the same number of batches (a collective per step must not
  wait for a rank that has run out). Validation does not pad: every pair counts once.

It subclasses ``DistributedSampler`` only so that Lightning leaves it in place.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler


def world() -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, else ``(1, 0)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class GlobalBatchSampler(DistributedSampler):
    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        *,
        seed: int | None = None,
        pad: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        size, current = world()
        num_replicas = size if num_replicas is None else num_replicas
        rank = current if rank is None else rank
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.batch_size = int(batch_size)
        self.order_seed = seed
        self.pad = pad

    def global_order(self) -> list[int]:
        """The order of all items in this epoch (``seed + epoch``; file order without seed)."""
        n = len(self.dataset)
        if self.order_seed is None:
            return list(range(n))
        generator = torch.Generator().manual_seed(int(self.order_seed) + self.epoch)
        # The draw a DataLoader(shuffle=True, generator=...) makes for its base seed first:
        # epoch 0 keeps the order the loader has always had (the README's runs used it).
        torch.empty((), dtype=torch.int64).random_(generator=generator)
        return torch.randperm(n, generator=generator).tolist()

    def rank_indices(self, order: list[int]) -> list[int]:
        world_size, batch = self.num_replicas, self.batch_size
        if world_size == 1:
            return order
        if self.pad or len(order) < world_size:
            order = order + order[: (-len(order)) % world_size]
        step = batch * world_size
        full = len(order) - len(order) % step
        indices = [
            i for start in range(0, full, step) for i in order[start + self.rank * batch :][:batch]
        ]
        tail = order[full:]
        share = len(tail) // world_size
        extra = len(tail) % world_size  # without padding, the first ranks take one more
        begin = self.rank * share + min(self.rank, extra)
        return indices + tail[begin : begin + share + (self.rank < extra)]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices(self.global_order()))

    def __len__(self) -> int:
        return len(self.rank_indices(list(range(len(self.dataset)))))
