"""Which samples each rank reads: the training sampler and the evaluation shards (loaders.sampler)."""
from __future__ import annotations

import pytest

from loaders.sampler import EpochBatchSampler, shard_of


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sampler_shards_without_overlap(world_size):
    def rank_batches(rank, drop_last):
        sampler = EpochBatchSampler(
            23, batch_size=4, drop_last=drop_last, shuffle=True, seed=1, rank=rank, world_size=world_size
        )
        sampler.set_epoch(2)
        batches = list(sampler)
        assert len(batches) == len(sampler) and all(epoch == 2 for batch in batches for _, epoch in batch)
        return [[index for index, _ in batch] for batch in batches]

    dropped = [sum(rank_batches(r, True), []) for r in range(world_size)]
    assert all(len(d) == 23 // (4 * world_size) * 4 for d in dropped)  # full batches only, equal per rank
    flat = sum(dropped, [])
    assert len(flat) == len(set(flat))
    padded = [sum(rank_batches(r, False), []) for r in range(world_size)]
    assert len({len(p) for p in padded}) == 1  # equal per rank: same number of steps
    assert set(sum(padded, [])) == set(range(23))  # nothing lost
    assert len(sum(padded, [])) - 23 == (-23) % world_size  # padding repeats only the wrap-around


def test_sampler_epochs_and_resume():
    sampler = EpochBatchSampler(30, batch_size=4, drop_last=True, shuffle=True, seed=0, rank=0, world_size=1)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0
    sampler.set_epoch(0, start_batch=5)
    assert list(sampler) == epoch0[5:]
    sequential = EpochBatchSampler(10, batch_size=4, drop_last=False, shuffle=False, seed=0, rank=0, world_size=1)
    assert [[i for i, _ in batch] for batch in sequential] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError, match="do not fill one batch"):
        EpochBatchSampler(7, batch_size=4, drop_last=True, shuffle=True, seed=0, rank=0, world_size=2)


@pytest.mark.parametrize(("num_samples", "world_size"), [(23, 1), (23, 4), (3, 5), (0, 2)])
def test_shards_concatenate_to_the_dataset_in_order(num_samples, world_size):
    shards = [shard_of(num_samples, rank=rank, world_size=world_size) for rank in range(world_size)]
    assert [i for shard in shards for i in shard] == list(range(num_samples))  # nothing dropped or repeated
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match="outside world_size"):
        shard_of(num_samples, rank=world_size, world_size=world_size)
