"""Epoch sampler that shards a seeded permutation across ranks and can resume mid-epoch."""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[tuple[int, int]]):
    """Each epoch, a permutation seeded by (seed, epoch), cut to a multiple of the global batch
    and dealt to the ranks in blocks of ``batch_size``: global batch g is positions
    [g*W*B, (g+1)*W*B) of the permutation and rank r takes the r-th block of B. Gathered in rank
    order, a global batch is exactly the batch a single process with batch W*B would see, so
    DDP runs reproduce single-process runs (same keys, same queue order).

    Yields ``(index, epoch)``: the dataset derives each sample's augmentation from it, so a
    sample's crop does not depend on workers, ranks or resumption.

    Args:
        length: dataset size.
        rank, world_size: this process and the number of processes.
        shuffle: permute (train) or keep order.
        seed: base seed, identical on every rank.
        batch_size: B, samples per rank per step.
    """

    def __init__(
        self, length: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0, batch_size: int = 1
    ) -> None:
        if length < world_size * batch_size:
            raise ValueError(f"dataset of {length} samples is smaller than one global batch ({world_size} x {batch_size})")
        self.length, self.rank, self.world_size, self.batch_size = length, rank, world_size, batch_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples of this rank already consumed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Skip the first ``consumed`` samples of this rank's share when ``epoch`` is iterated next.

        Sets the epoch too: Lightning creates the first iterator (and workers start pulling
        indices) before it calls ``set_epoch``.
        """
        self._resume = (epoch, consumed)
        self.epoch = epoch

    def _skip(self) -> int:
        return self._resume[1] if self._resume and self._resume[0] == self.epoch else 0

    def __len__(self) -> int:
        # The full share even when resuming: Lightning counts the epoch's batches from its own
        # restored progress, and the skipped ones are part of that count.
        return (self.length // (self.world_size * self.batch_size)) * self.batch_size

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        steps = self.length // (self.world_size * self.batch_size)
        blocks = order[: steps * self.world_size * self.batch_size].view(steps, self.world_size, self.batch_size)
        mine = blocks[:, self.rank].reshape(-1)[self._skip() :].tolist()
        self._resume = None
        return iter([(index, self.epoch) for index in mine])
