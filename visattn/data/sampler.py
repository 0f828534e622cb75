"""Samplers that split data across the processes of a distributed run, reproducibly per epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    """A permutation seeded by ``seed + epoch``, repeated to ``num_samples`` per rank and sharded by rank.

    With ``num_samples=None`` each rank draws ``ceil(len / world_size)`` indices (one pass over the data, as
    torch's ``DistributedSampler``); an iteration-based run passes the number of samples it needs per rank.
    Call ``set_epoch`` before each epoch: the order depends only on (seed, epoch), so a resumed run draws the
    same batches as an uninterrupted one.
    """

    def __init__(
            self,
            length: int,
            *,
            num_samples: int | None = None,
            rank: int = 0,
            world_size: int = 1,
            shuffle: bool = True,
            seed: int = 0,
    ) -> None:
        if length < 1:
            raise ValueError(f'the dataset is empty (length {length})')
        if not 0 <= rank < world_size:
            raise ValueError(f'rank must be in [0, {world_size}), got {rank}')
        self.length, self.rank, self.world_size = length, rank, world_size
        self.num_samples = num_samples or math.ceil(length / world_size)
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        total = self.num_samples * self.world_size
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        parts, n = [], 0
        while n < total:
            part = torch.randperm(self.length, generator=gen) if self.shuffle else torch.arange(self.length)
            parts.append(part)
            n += self.length
        order = torch.cat(parts)[:total]
        return iter(order[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world_size, ...``: disjoint shards that together cover the data exactly once,
    so metrics summed across ranks count every evaluation sample once (no padding duplicates)."""

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f'rank must be in [0, {world_size}), got {rank}')
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
