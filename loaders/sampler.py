"""Which samples each rank reads, in which order: the training order and the evaluation shards.

Every backend takes its order from here, so with the same seed the torchvision, DALI and FFCV
loaders visit the same samples in the same order, and a resumed epoch replays exactly.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch


def shard_of(num_samples: int, *, rank: int, world_size: int) -> range:
    """Rank's contiguous part of range(num_samples), for a pass in dataset order.

    The parts of ranks 0..world_size-1 in rank order are range(num_samples) itself: nothing is
    dropped or repeated, and their sizes differ by at most one; so the ranks' results gathered
    in rank order are in dataset order.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is outside world_size {world_size}")
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of (dataset index, epoch) keys for one rank.

    Order: a permutation drawn from (seed, epoch) (or sequential when shuffle is False), the
    same on every rank; rank r takes positions r, r + world_size, ... so ranks never overlap.
    drop_last=True: the tail is dropped so every rank gets len(self) full batches.
    drop_last=False: the order is padded by wrapping around to a multiple of world_size (like
    torch's DistributedSampler; with one rank nothing is repeated) and the last batch may be
    short. set_epoch(epoch, start_batch) skips the first start_batch batches (mid-epoch resume).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        drop_last: bool,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"sampler: rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size, self.drop_last = num_samples, batch_size, drop_last
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(
                f"sampler: {num_samples} samples do not fill one batch of {batch_size} on each of {world_size} ranks"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        """Batches of a full epoch on this rank (start_batch not subtracted)."""
        if self.drop_last:
            return self.num_samples // (self.batch_size * self.world_size)
        return math.ceil(math.ceil(self.num_samples / self.world_size) / self.batch_size)

    def rank_indices(self) -> np.ndarray:
        """This rank's dataset indices for the current epoch, in order."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        if self.drop_last:
            order = order[: len(self) * self.batch_size * self.world_size]
        else:
            padded = math.ceil(self.num_samples / self.world_size) * self.world_size
            order = np.resize(order, padded)  # np.resize repeats from the start
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        indices = self.rank_indices()
        for start in range(self.start_batch * self.batch_size, len(indices), self.batch_size):
            yield [(int(i), self.epoch) for i in indices[start : start + self.batch_size]]
