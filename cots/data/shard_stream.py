"""One epoch of a :class:`~cots.data.shard_set.ShardSet` as a single stream of samples, readable from any position.

**What an epoch is.** Source s (N_s samples, weight w_s) contributes n_s = round(w_s * N_s)
samples (at least 1): whole passes over its shards, each pass in its own seeded shard order,
then the first samples of one more seeded pass, cut inside a shard, for the fraction. So w_s =
1 is every sample once, 2 every sample twice (a repeat gets another crop), 0.5 a seeded half
that changes from epoch to epoch; the epoch has N = sum n_s samples, the same every epoch.
The sources are then interleaved in a seeded random order: position p of the epoch stream is
from source ``labels[p]``, an array holding s exactly n_s times, shuffled by (seed, epoch).
Any window of the stream thus mixes the sources in proportion n_s / N.

**Reading a window** [a, b) (one DataLoader worker's run): the samples of source s before a
number ``count(labels[:a] == s)``; each source's own stream is read from there, seeking into
the shard that holds that position, and the samples are taken in ``labels[a:b]`` order. No
sample before a window is decoded or, in an indexed shard, even read.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cots.data.shard_index import ShardError
from cots.data.shard_set import Shard, ShardSet, SourceShards
from cots.data.tar_reader import read_shard


@dataclass(frozen=True)
class Segment:
    """Samples [lo, hi) of one shard, in pass ``repeat`` (0 for the first) over its source."""

    shard: Shard
    lo: int
    hi: int
    repeat: int


def epoch_size(source: SourceShards) -> int:
    """n_s = round(w_s * N_s), at least one sample."""
    return max(1, round(source.source.weight * source.num_samples))


def source_segments(source: SourceShards, seed: int, epoch: int, source_index: int) -> list[Segment]:
    """Source s's part of an epoch: whole seeded passes over its shards, the last one cut at n_s samples."""
    remaining, repeat, segments = epoch_size(source), 0, []
    while remaining > 0:
        order = list(range(len(source.shards)))
        # (0, 0) keeps the tag one source had before sources could be mixed: resumes stay exact.
        tag = f"shards-{seed}-{epoch}"
        if (source_index, repeat) != (0, 0):
            tag += f"-{source_index}-{repeat}"
        random.Random(tag).shuffle(order)
        for i in order:
            take = min(source.shards[i].samples, remaining)
            if take:
                segments.append(Segment(source.shards[i], 0, take, repeat))
                remaining -= take
            if not remaining:
                break
        repeat += 1
    return segments


class EpochStream:
    """The samples of one epoch in stream order; :meth:`read` gives any window of it.

    Each sample comes as the reader's dict plus ``__source__`` (source index), ``__id__``
    (sample id, :mod:`cots.data.shard_set`) and ``__repeat__`` (the pass over its source).
    """

    def __init__(
        self, shard_set: ShardSet, seed: int, epoch: int, wanted=None, block_size: int | None = None
    ) -> None:
        self.shard_set, self.seed, self.epoch = shard_set, seed, epoch
        self.wanted, self.block_size = wanted, block_size
        self.segments = [source_segments(s, seed, epoch, i) for i, s in enumerate(shard_set.sources)]
        self.sizes = [sum(seg.hi - seg.lo for seg in segments) for segments in self.segments]
        self._labels: np.ndarray | None = None

    def __len__(self) -> int:
        return sum(self.sizes)

    def labels(self) -> np.ndarray:
        """(N,) uint16 source of each stream position: s repeated n_s times, shuffled by (seed, epoch)."""
        if self._labels is None:
            labels = np.repeat(np.arange(len(self.sizes), dtype=np.uint16), self.sizes)
            rng = np.random.default_rng(random.Random(f"mix-{self.seed}-{self.epoch}").getrandbits(64))
            rng.shuffle(labels)
            self._labels = labels
        return self._labels

    def read(self, start: int, stop: int) -> Iterator[dict]:
        """Stream positions [start, stop)."""
        if len(self.sizes) == 1:
            yield from self._read_source(0, start, stop)
            return
        labels = self.labels()
        before = np.bincount(labels[:start], minlength=len(self.sizes))
        within = np.bincount(labels[start:stop], minlength=len(self.sizes))
        readers = [self._read_source(s, int(before[s]), int(before[s] + within[s])) for s in range(len(self.sizes))]
        for label in labels[start:stop].tolist():
            yield next(readers[label])

    def _read_source(self, s: int, start: int, stop: int) -> Iterator[dict]:
        offset = 0
        for seg in self.segments[s]:
            length = seg.hi - seg.lo
            lo, hi = max(start, offset), min(stop, offset + length)
            if lo < hi:
                first = seg.lo + lo - offset
                read = 0
                for read, sample in enumerate(self._shard_samples(seg.shard, first, hi - lo), 1):
                    sample.update(__source__=s, __id__=seg.shard.first_id + first + read - 1, __repeat__=seg.repeat)
                    yield sample
                if read != hi - lo:
                    raise ShardError(
                        f"{seg.shard.url}: ended after {first + read} samples; its index says {seg.shard.samples} "
                        "(index it again)"
                    )
            offset += length
            if offset >= stop:
                return

    def _shard_samples(self, shard: Shard, skip: int, take: int) -> Iterator[dict]:
        return read_shard(shard.url, skip, take, shard.record, self.shard_set.stride, self.wanted, self.block_size)


def resampled_samples(shard_set: ShardSet, rng: random.Random, count: int, wanted=None, block_size=None):
    """``count`` samples from whole shards drawn with replacement, shard i with probability ∝ w_s * samples_i."""
    shards = [(s, shard) for s, source in enumerate(shard_set.sources) for shard in source.shards if shard.samples]
    weights = [shard_set.sources[s].source.weight * shard.samples for s, shard in shards]
    while count > 0:
        s, shard = rng.choices(shards, weights=weights)[0]
        for i, sample in enumerate(
            read_shard(shard.url, 0, shard.samples, shard.record, shard_set.stride, wanted, block_size)
        ):
            if count == 0:
                return
            count -= 1
            sample.update(__source__=s, __id__=shard.first_id + i, __repeat__=0)
            yield sample
