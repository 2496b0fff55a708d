"""The train loader's order depends only on (seed, epoch); a restored position skips exactly
the batches already served."""

from __future__ import annotations

from fpo.data.resumable import ResumableDataLoader
from fpo.data.sampler import GlobalBatchSampler

DATA = list(range(10))


def loader(seed: int = 0) -> ResumableDataLoader:
    sampler = GlobalBatchSampler(DATA, 3, seed=seed, num_replicas=1, rank=0)
    return ResumableDataLoader(DATA, batch_size=3, sampler=sampler)


def epoch(dl: ResumableDataLoader, e: int) -> list[list[int]]:
    dl.sampler.set_epoch(e)
    return [b.tolist() for b in dl]


def test_order_depends_on_seed_and_epoch_only():
    a, b = loader(), loader()
    assert epoch(a, 0) == epoch(b, 0) and epoch(a, 1) == epoch(b, 1)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(loader(seed=1), 0) != epoch(a, 0)
    assert sorted(x for batch in epoch(a, 3) for x in batch) == DATA


def test_restored_position_serves_the_rest_of_that_epoch_only():
    first = loader()
    first.sampler.set_epoch(2)
    served = []
    for batch in first:
        served.append(batch.tolist())
        if len(served) == 2:
            break
    state = first.state_dict()
    assert state == {"epoch": 2, "batches": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert epoch(resumed, 2) == epoch(loader(), 2)[2:]
    assert epoch(resumed, 2) == epoch(loader(), 2)  # the skip applies once
    other = loader()
    other.load_state_dict(state)
    assert epoch(other, 3) == epoch(loader(), 3)  # a position of another epoch is ignored
