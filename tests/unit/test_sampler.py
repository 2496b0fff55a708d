"""The training order is the same for any number of devices (fpo.data.sampler)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from fpo.data.sampler import GlobalBatchSampler


def epochs(loader: DataLoader, n: int) -> list[list[list[int]]]:
    """``n`` epochs, announced to the sampler as Lightning does (``set_epoch``)."""
    result = []
    for epoch in range(n):
        loader.sampler.set_epoch(epoch)
        result.append([batch.tolist() for batch in loader])
    return result


def loader(data, batch_size, *, rank=0, world=1, shuffle=True, pad=True) -> DataLoader:
    sampler = GlobalBatchSampler(
        data, batch_size, seed=3 if shuffle else None, pad=pad, num_replicas=world, rank=rank
    )
    return DataLoader(data, batch_size=batch_size, sampler=sampler)


def test_one_process_order_is_drawn_from_seed_plus_epoch():
    """Epoch e depends on ``seed + e`` alone (so a restarted process repeats it); epoch 0 is
    the order of ``DataLoader(shuffle=True)`` with a generator seeded ``seed``."""
    data = list(range(11))
    got = epochs(loader(data, 3), 3)
    again = epochs(loader(data, 3), 3)
    assert got == again  # a fresh sampler (a restarted process) repeats every epoch
    plain = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert got[0] == [batch.tolist() for batch in plain]
    assert got[0] != got[1]
    assert epochs(loader(data, 3, shuffle=False), 1)[0][0] == [0, 1, 2]


@pytest.mark.parametrize("world", [2, 4])
def test_each_step_of_all_ranks_is_a_step_of_one_process_with_accumulation(world):
    data = list(range(16))
    single = [b for epoch in epochs(loader(data, 2), 2) for b in epoch]
    ranks = [epochs(loader(data, 2, rank=r, world=world), 2) for r in range(world)]
    for epoch in range(2):
        for step in range(len(ranks[0][epoch])):
            together = sorted(i for r in range(world) for i in ranks[r][epoch][step])
            micro = single[epoch * 8 + step * world : epoch * 8 + (step + 1) * world]
            assert together == sorted(i for batch in micro for i in batch)


def test_training_pads_to_equal_steps_and_validation_counts_each_pair_once():
    data = list(range(7))
    train = [list(GlobalBatchSampler(data, 2, num_replicas=2, rank=r)) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 4
    val = [list(GlobalBatchSampler(data, 2, pad=False, num_replicas=2, rank=r)) for r in range(2)]
    assert sorted(val[0] + val[1]) == data
