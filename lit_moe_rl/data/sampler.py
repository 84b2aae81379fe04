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
        self.consumed = 0  # rows of this epoch trained on (counted by the DataModule, not when prefetched)
        self._skip = 0
        self._pending: tuple[int, int] | None = None  # a resume position not yet applied
        self._offset = 0  # data epoch minus Lightning's epoch (they differ after a mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        """Lightning's epoch number. A run stopped mid-epoch by ``max_steps`` has already counted that
        epoch as done, so after a resume Lightning's number runs ahead of the data's: the first call
        after :meth:`resume_at` fixes the offset between them and later calls keep it."""
        if self._pending is not None:
            self._offset = self._pending[0] - epoch
            self._apply_pending()
        else:
            self.epoch = epoch + self._offset

    def resume_at(self, epoch: int, rows_consumed: int) -> None:
        """Continue data epoch ``epoch`` after this rank's first ``rows_consumed`` rows."""
        self._pending = (epoch, rows_consumed)

    def _apply_pending(self) -> None:
        assert self._pending is not None
        self.epoch, self._skip = self._pending
        self._pending = None

    def position(self) -> tuple[int, int]:
        """``(data epoch, rows consumed in it)``; a finished epoch is the start of the next one."""
        if self.consumed >= len(self):
            return self.epoch + 1, 0
        return self.epoch, self.consumed

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_rows))
        generator = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(self.num_rows, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        if self._pending is not None:
            self._apply_pending()
        skip, self._skip = self._skip, 0
        self.consumed = skip
        usable = len(self) * self.num_replicas
        yield from self.order(self.epoch)[self.rank : usable : self.num_replicas][skip:]

    def __len__(self) -> int:
        return self.num_rows // self.num_replicas
