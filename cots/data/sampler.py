"""Epoch sampler that shards a seeded permutation across ranks and can resume mid-epoch."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Sampler


def group_by_length(
    order: torch.Tensor, lengths: torch.Tensor, global_batch: int, bucket_batches: int, generator: torch.Generator
) -> torch.Tensor:
    """Reorder a permutation so that each global batch holds captions of similar length.

    ``order`` (N,) is cut into buckets of ``bucket_batches`` global batches in its own order; each
    bucket is sorted by ``lengths[order]`` (stable: equal lengths keep their random order) and cut
    into global batches, and the batches of all buckets are then shuffled with ``generator``. A batch
    is padded to its longest caption, so its text-tower cost follows its longest caption: on the
    emoji captions (7.6 tokens on average) a random batch of 64 pads to 18 tokens on average, buckets
    of 16 batches to 8.2. The samples of an epoch are the same; only who shares a batch changes, and
    that costs: lengths follow content (families of names share a length), so a batch is no longer a
    random sample (on the emoji demo at 32 px, -45 rsum on val for 1.6x the steps; README). Same-text
    captions (``pair_groups``) meet more often. ``TextTower(length_groups=k)`` saves padding inside
    the tower instead, on random batches.

    Args:
        order: (N,) long, N a multiple of ``global_batch``: the epoch's sample order.
        lengths: (dataset size,) tokens of each sample's caption.
        global_batch: samples per optimizer step over all ranks (W x B).
        bucket_batches: global batches per bucket (1: the order is unchanged).
    Returns:
        (N,) long: the same samples, regrouped.
    """
    if order.numel() % global_batch:
        raise ValueError(f"{order.numel()} samples are not a whole number of global batches of {global_batch}")
    if bucket_batches <= 1:
        return order
    bucket = bucket_batches * global_batch
    batches = []
    for start in range(0, order.numel(), bucket):
        chunk = order[start : start + bucket]
        by_length = chunk[torch.argsort(lengths[chunk], stable=True)]
        batches.extend(by_length.split(global_batch))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return torch.cat([batches[i] for i in shuffled])


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
        lengths: (length,) caption tokens of each sample, with ``length_buckets`` > 1: global batches of
            similar caption length (:func:`group_by_length`), ``length_buckets`` global batches per bucket.
    """

    def __init__(
        self,
        length: int,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        batch_size: int = 1,
        lengths: Sequence[int] | None = None,
        length_buckets: int = 0,
    ) -> None:
        if length < world_size * batch_size:
            raise ValueError(f"dataset of {length} samples is smaller than one global batch ({world_size} x {batch_size})")
        if length_buckets > 1 and (lengths is None or len(lengths) != length):
            raise ValueError(f"length_buckets={length_buckets} needs the caption length of each of the {length} samples")
        self.lengths = torch.as_tensor(lengths, dtype=torch.long) if length_buckets > 1 else None
        self.length_buckets = length_buckets
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
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.length, generator=generator) if self.shuffle else torch.arange(self.length)
        steps = self.length // (self.world_size * self.batch_size)
        order = order[: steps * self.world_size * self.batch_size]
        if self.lengths is not None:
            order = group_by_length(order, self.lengths, self.world_size * self.batch_size, self.length_buckets, generator)
        blocks = order.view(steps, self.world_size, self.batch_size)
        mine = blocks[:, self.rank].reshape(-1)[self._skip() :].tolist()
        self._resume = None
        return iter([(index, self.epoch) for index in mine])
