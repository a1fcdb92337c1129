"""Resumable, seeded per-rank batching of stage-3 prompts (and ptx text).

The order of epoch e is DistributedSampler's permutation for (seed, e): identical on every rank and
in every run, so a resumed run that skips the first `start_batch` batches of epoch e sees exactly
what the killed run would have seen next. No worker processes: prompt batches are small.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from torch.utils.data import DistributedSampler

from rlhf.deepspeed_utils import get_rank, get_world_size


class ResumableLoader:
    def __init__(self, dataset: Any, batch_size: int, collate_fn: Callable, *, seed: int,
                 shuffle: bool = True, drop_last: bool = True):
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate_fn = collate_fn
        self.sampler = DistributedSampler(dataset, num_replicas=get_world_size(), rank=get_rank(),
                                          shuffle=shuffle, seed=seed, drop_last=drop_last)
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def indices(self, epoch: int) -> list[list[int]]:
        """This rank's batches of dataset indices for `epoch`."""
        self.sampler.set_epoch(epoch)
        idx = list(self.sampler)
        return [idx[i:i + self.batch_size] for i in range(0, len(self) * self.batch_size, self.batch_size)]

    def iter_from(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[int, list[int], Any]]:
        """(batch index, dataset indices, collated batch) of `epoch`, from `start_batch` on."""
        for b, ids in enumerate(self.indices(epoch)):
            if b >= start_batch:
                yield b, ids, self.collate_fn([self.dataset[i] for i in ids])

    def __iter__(self):
        for _, _, batch in self.iter_from(0):
            yield batch


class CyclingLoader:
    """Endless batches over epochs (the ptx stream); its position is part of the checkpoint."""

    def __init__(self, loader: ResumableLoader, epoch: int = 0, batch: int = 0):
        self.loader, self.epoch, self.batch = loader, epoch, batch
        if len(loader) == 0:
            raise ValueError("the unsupervised (ptx) dataset has fewer rows than one batch per rank")
        self._cache: tuple[int, list[list[int]]] | None = None

    def next(self) -> Any:
        if self.batch >= len(self.loader):
            self.epoch, self.batch = self.epoch + 1, 0
        if self._cache is None or self._cache[0] != self.epoch:
            self._cache = (self.epoch, self.loader.indices(self.epoch))
        ids = self._cache[1][self.batch]
        self.batch += 1
        return self.loader.collate_fn([self.loader.dataset[i] for i in ids])

    def position(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}
