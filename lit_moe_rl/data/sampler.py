"""A seeded, resumable sampler: the training order is a pure function of (seed, epoch, position)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """Shuffles ``num_rows`` with ``seed + epoch``; after :meth:`resume_at` the next iteration skips
    the rows already consumed, so a run resumed mid-epoch sees the prompts an uninterrupted run would.

    Lightning calls :meth:`set_epoch` at the start of every epoch (as for ``DistributedSampler``).
    """

    def __init__(self, num_rows: int, *, seed: int, shuffle: bool = True) -> None:
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, rows_consumed: int) -> None:
        self.epoch, self._skip = epoch, rows_consumed

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        yield from self.order(self.epoch)[skip:]

    def __len__(self) -> int:
        return self.num_rows
