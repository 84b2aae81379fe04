"""A seeded, resumable, rank-aware sampler: the order is a pure function of (seed, epoch, position)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffles ``num_rows`` with ``seed + epoch``; after :meth:`resume_at` the next iteration skips
    the rows already consumed, so a run resumed mid-epoch sees the prompts an uninterrupted run would.

    With ``num_replicas`` ranks, rank ``r`` takes positions ``r, r + W, r + 2W, ...`` of the one global
    order (the tail that does not divide by W is dropped), so step ``s`` of W ranks with ``b`` prompts
    each trains on the same prompts as step ``s`` of one process with ``W·b``, and a group of
    completions never spans ranks. It subclasses ``DistributedSampler`` so that Lightning keeps it
    instead of wrapping it; Lightning calls :meth:`set_epoch` at the start of every epoch.
    """

    def __init__(
        self, num_rows: int, *, seed: int, shuffle: bool = True, num_replicas: int = 1, rank: int = 0
    ) -> None:
        # DistributedSampler.__init__ is not called: it wants a dataset and a process group, neither needed.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"sampler: rank {rank} is not in [0, {num_replicas})")
        self.num_rows = num_rows
        self.seed = seed
        self.shuffle = shuffle
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, rows_consumed: int) -> None:
        """Continue epoch ``epoch`` after this rank's first ``rows_consumed`` rows."""
        self.epoch, self._skip = epoch, rows_consumed

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        usable = len(self) * self.num_replicas
        yield from self.order(self.epoch)[self.rank : usable : self.num_replicas][skip:]

    def __len__(self) -> int:
        return self.num_rows // self.num_replicas
