"""The training order is the same for any number of devices (fpo.data.sampler)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from fpo.data.sampler import GlobalBatchSampler


def epochs(loader: DataLoader, n: int) -> list[list[list[int]]]:
    return [[batch.tolist() for batch in loader] for _ in range(n)]


def loader(data, batch_size, *, rank=0, world=1, shuffle=True, pad=True) -> DataLoader:
    generator = torch.Generator().manual_seed(3) if shuffle else None
    sampler = GlobalBatchSampler(
        data, batch_size, generator=generator, pad=pad, num_replicas=world, rank=rank
    )
    return DataLoader(data, batch_size=batch_size, sampler=sampler, generator=generator)


def test_one_process_keeps_the_shuffled_loader_order():
    data = list(range(11))
    plain = DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert epochs(loader(data, 3), 3) == epochs(plain, 3)


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
