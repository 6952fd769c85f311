"""WebDataset tar shards of image-caption pairs: the format, and a streaming training set over it.

Layout of ``DIR`` (written by ``cots-data shards``, :func:`cots.prepare.shard_writer.write_shards`):

* ``shard-000000.tar`` ...: one sample per (image, caption) pair, the unit the training path
  draws, so that an epoch is "every pair once" exactly as with :class:`ImageTextPairs`. An
  image with c captions is stored c times; the pairs are written in a seeded random order, so
  that an image's captions land in different shards and two of them share a batch as rarely
  as in the map-style path. Members of a sample: ``<key>.<ext>`` the original image bytes
  (``jpg``, ``png``, ``webp``, ... from the decoded format, never re-encoded), ``<key>.txt``
  the cleaned caption (UTF-8) and ``<key>.json`` ``{"pair_index", "image_index",
  "caption_index", "image"}``. ``key`` is the pair index, zero-padded to 10 digits, numbered
  like ``ImageTextPairs.pairs`` (manifest order, empty captions not numbered), so ``index``
  means the same pair on both paths; pairs of images that cannot be decoded are left out at
  conversion (gaps in the numbers) and counted per reason. Tars are deterministic (fixed
  mtime, owner and mode): a re-run writes identical bytes.
* ``shards.json``: shards with their sample counts, bytes and sha1, totals, skip counts,
  the source manifest and its sha1. Written last (temporary file + rename) and removed
  first by a re-run: a folder without it is an unfinished conversion and is refused.

Reading (:class:`ShardPairs`): the shards of an epoch, in a permutation seeded by (seed,
epoch), form one stream of samples. Rank r of W takes the r-th block of L samples of it
(L = per-rank samples rounded down to whole batches); within a rank, DataLoader worker w of
K takes a contiguous run of whole batches. The split is by sample position, using the counts
in ``shards.json``, not by whole shards: shards of unequal size would give ranks unequal
numbers of batches (a DDP hang, or data dropped to avoid it), and any number of shards works
for any W x K. A worker opens only the shards its run overlaps, skipping members by seeking
(local or mounted files; no ``pipe:`` URLs). Each rank yields exactly ``len(dataset)``
samples; the < W * batch_size left over are a different tail each epoch.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import random
import tarfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cots.data.datasets import MAX_SUBSTITUTIONS, clean_caption
from cots.data.images import BadSample, load_rgb

INDEX_NAME = "shards.json"
FORMAT = "cots-shards"
VERSION = 1
KEY_DIGITS = 10
TEXT_MEMBERS = ("txt", "json")


class ShardError(ValueError):
    """Shards that cannot be written or read as indexed; the message names the folder or file."""


@dataclass(frozen=True)
class ShardIndex:
    """The shards of a finished conversion: paths and sample counts, in file order."""

    paths: tuple[Path, ...]
    counts: tuple[int, ...]
    info: dict

    @property
    def num_samples(self) -> int:
        return sum(self.counts)


def load_shard_index(shard_dir: str | Path) -> ShardIndex:
    """Read ``shards.json``; every listed shard must exist with its recorded size."""
    shard_dir = Path(shard_dir)
    path = shard_dir / INDEX_NAME
    if not path.is_file():
        raise ShardError(f"{shard_dir}: no {INDEX_NAME}: not a shard folder, or its conversion did not finish (re-run cots-data shards)")
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ShardError(f"{path}: not a {FORMAT} v{VERSION} index")
    paths = tuple(shard_dir / s["name"] for s in info["shards"])
    for shard, p in zip(info["shards"], paths):
        if not p.is_file() or p.stat().st_size != shard["bytes"]:
            raise ShardError(f"{p}: missing or changed since {path} was written (re-run cots-data shards)")
    return ShardIndex(paths, tuple(s["samples"] for s in info["shards"]), info)


def read_shard(path: Path, skip: int = 0, take: int | None = None) -> Iterator[dict]:
    """Samples ``skip`` .. ``skip + take`` of one tar as ``{"__key__": key, ext: bytes}``.

    The members of skipped samples are passed over by seeking, not read.
    """
    with tarfile.open(path, "r:") as tar:
        position, key, sample = -1, None, None
        for member in tar:
            head, slash, tail = member.name.rpartition("/")
            stem, _, ext = tail.partition(".")
            if head + slash + stem != key:
                if sample is not None:
                    yield sample
                key, position = head + slash + stem, position + 1
                if take is not None and position >= skip + take:
                    return
                sample = {"__key__": key} if position >= skip else None
            if sample is not None and member.isfile():
                sample[ext] = tar.extractfile(member).read()
        if sample is not None:
            yield sample


def shard_captions(shard_dir: str | Path) -> list[str]:
    """Every caption of a shard folder in pair-index order, as ``ImageTextPairs.captions()`` lists
    them (less the pairs skipped at conversion): a tokenizer trained on them is the same."""
    keyed = []
    for path in load_shard_index(shard_dir).paths:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    keyed.append((member.name, tar.extractfile(member).read().decode("utf-8", "replace")))
    return [caption for _, caption in sorted(keyed)]


def buffer_shuffle(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream through a buffer of ``size`` items (1 or less: unchanged order)."""
    if size <= 1:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class ShardPairs(IterableDataset):
    """Image-caption pairs streamed from shards; items as :class:`ImageTextPairs` yields them:
    ``{"image": transform(RGB), "caption": str, "index": pair index, "skipped": [reasons]}``.

    Epoch mode: every rank yields ``len(self)`` samples, a disjoint share of the epoch's stream
    (module docstring); all ranks together see every sample once, less a remainder smaller
    than one global batch. Resampled mode: each (rank, worker) draws shards with replacement,
    seeded by (seed, epoch, rank, worker), and yields its share of ``samples_per_epoch``.

    A sample that cannot be decoded is replaced by the next usable one of the same worker
    (the last one at the end of its run) and its reason travels in ``skipped``, as in
    ImageTextPairs: counts per rank and worker never change, so ranks stay in step.

    Each worker's order is a function of (seed, epoch, rank, worker, W, K, batch_size), and a
    sample's crop of (seed, epoch, pair index) as in ImageTextPairs (resampled: of its stream
    position). Shuffling: shards by permutation, samples through a buffer of
    ``shuffle_buffer`` raw samples per worker (memory: that many encoded images).

    The epoch reaches DataLoader workers through shared memory, so :meth:`set_epoch` works
    with persistent workers; use :class:`ShardLoader` to have it called on each ``iter()``.

    Args:
        shard_dir: folder written by ``cots-data shards``.
        transform: PIL RGB image -> tensor.
        rank, world_size: this process and the number of processes.
        seed: base seed, identical on every rank.
        batch_size: B, samples per rank per step: ranks and workers yield whole batches.
        shuffle_buffer: raw samples per worker's shuffle buffer.
        resampled: draw shards with replacement instead of epochs over the data.
        samples_per_epoch: resampled mode: samples per epoch over all ranks (default: the
            number of samples in the shards).
    """

    def __init__(
        self,
        shard_dir: str | Path,
        transform: Callable,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int = 1,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
    ) -> None:
        if samples_per_epoch is not None and not resampled:
            raise ShardError("samples_per_epoch applies to resampled mode only (an epoch is every sample once)")
        self.shard_dir = Path(shard_dir)
        self.index = load_shard_index(shard_dir)
        self.transform, self.rank, self.world_size, self.seed = transform, rank, world_size, seed
        self.batch_size, self.shuffle_buffer, self.resampled = batch_size, shuffle_buffer, resampled
        total = (samples_per_epoch or self.index.num_samples) if resampled else self.index.num_samples
        self.samples_per_rank = total // (world_size * batch_size) * batch_size
        if self.samples_per_rank == 0:
            raise ShardError(f"{shard_dir}: {total} samples per epoch are fewer than one global batch ({world_size} x {batch_size})")
        # [epoch, epoch to resume (-1: none), samples of this rank already consumed in it]
        self._state = multiprocessing.RawArray("q", [0, -1, 0])

    def __len__(self) -> int:
        return self.samples_per_rank

    @property
    def epoch(self) -> int:
        return self._state[0]

    def set_epoch(self, epoch: int) -> None:
        self._state[0] = epoch

    def resume_from(self, epoch: int, consumed: int) -> None:
        """Make ``epoch`` the next one and skip this rank's first ``consumed`` samples of it
        (whole batches; they are passed over without decoding)."""
        self._state[:] = [epoch, epoch, consumed]

    def captions(self) -> list[str]:
        return shard_captions(self.shard_dir)

    def _worker_run(self, worker: int, workers: int) -> tuple[int, int]:
        """(first sample, samples) of this worker in the rank's epoch stream: whole batches."""
        batches = self.samples_per_rank // self.batch_size
        first = worker * (batches // workers) + min(worker, batches % workers)
        count = batches // workers + (worker < batches % workers)
        return first * self.batch_size, count * self.batch_size

    def _raw_epoch(self, epoch: int, start: int, stop: int) -> Iterator[dict]:
        """Samples at positions [start, stop) of the epoch's stream (shards in seeded order)."""
        order = list(range(len(self.index.paths)))
        random.Random(f"shards-{self.seed}-{epoch}").shuffle(order)
        offset = 0
        for shard in order:
            path, count = self.index.paths[shard], self.index.counts[shard]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                read = 0
                for read, sample in enumerate(read_shard(path, lo - offset, hi - lo), 1):
                    yield sample
                if read != hi - lo:
                    raise ShardError(f"{path}: ended after {lo - offset + read} samples; {INDEX_NAME} says {count}")
            offset += count
            if offset >= stop:
                return

    def _raw_resampled(self, rng: random.Random, count: int) -> Iterator[dict]:
        while True:
            for sample in read_shard(self.index.paths[rng.randrange(len(self.index.paths))]):
                if count == 0:
                    return
                count -= 1
                yield sample

    def _decode(self, sample: dict, crop_seed: int) -> dict:
        caption = clean_caption(sample.get("txt", b"").decode("utf-8", "replace"))
        if not caption:
            raise BadSample("empty_caption", sample["__key__"])
        data = next((v for k, v in sample.items() if k not in TEXT_MEMBERS and k != "__key__"), None)
        if data is None:
            raise BadSample("missing_image", sample["__key__"])
        with torch.random.fork_rng(devices=[]):
            # The crop is a function of the sample. Only the CPU generator: fork_rng(devices=[])
            # restores no other (and torch.manual_seed costs ~1 ms in its wrappers).
            torch.default_generator.manual_seed(crop_seed & 0x7FFF_FFFF_FFFF_FFFF)
            image = self.transform(load_rgb(io.BytesIO(data)))
        item = {"image": image, "caption": caption, "index": int(sample["__key__"]), "skipped": []}
        if "json" in sample:  # the pair's image, for data.pair_groups=image
            item["image_id"] = int(json.loads(sample["json"]).get("image_index", -1))
        return item

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        loader_worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, resume_epoch, consumed = self._state[:]
        # The DataLoader takes batch b of a rank from worker b % K (in-order round robin). A
        # resumed epoch starts at batch `done`: loader worker 0 plays worker done % K, and so on.
        done = consumed // self.batch_size if resume_epoch == epoch else 0
        worker = (loader_worker + done) % workers
        skip = (done // workers + (worker < done % workers)) * self.batch_size
        start, count = self._worker_run(worker, workers)
        tag = f"{self.seed}-{epoch}-{self.rank}-{worker}"
        if self.resampled:
            raw = self._raw_resampled(random.Random(f"resampled-{tag}"), count)
        else:
            start += self.rank * self.samples_per_rank
            raw = self._raw_epoch(epoch, start, start + count)
        raw = buffer_shuffle(raw, self.shuffle_buffer, random.Random(f"buffer-{tag}"))
        yield from self._decoded(raw, epoch, worker, skip)

    def _decoded(self, raw: Iterator[dict], epoch: int, worker: int, skip: int) -> Iterator[dict]:
        """Decode after the first ``skip``; a bad sample becomes the next good one (or the last)."""
        reasons: list[str] = []  # of the bad samples since the last good one
        last = None
        passed: deque[dict] = deque(maxlen=MAX_SUBSTITUTIONS)  # skipped on resume: fallbacks at the end
        for position, sample in enumerate(raw):
            if position < skip:
                passed.appendleft(sample)
                continue
            try:
                item = self._decode(sample, self._crop_seed(sample, epoch, worker, position))
            except BadSample as bad:
                reasons.append(bad.reason)
                if len(reasons) >= MAX_SUBSTITUTIONS:
                    raise RuntimeError(f"{len(reasons)} consecutive unusable samples in shards: {Counter(reasons)}") from None
                continue
            yield from self._substitutes(item, reasons)
            yield item
            last, reasons = item, []
        if reasons:
            for sample in passed if last is None else ():
                try:
                    last = self._decode(sample, self._crop_seed(sample, epoch, worker, -1))
                    break
                except BadSample:
                    continue
            if last is None:
                raise RuntimeError(f"no usable sample in this worker's share of the shards: {Counter(reasons)}")
            yield from self._substitutes(last, reasons)

    @staticmethod
    def _substitutes(item: dict, reasons: list[str]) -> Iterator[dict]:
        """One copy of ``item`` per bad sample it replaces; the first carries the reasons."""
        for i in range(len(reasons)):
            yield {**item, "skipped": reasons if i == 0 else []}

    def _crop_seed(self, sample: dict, epoch: int, worker: int, position: int) -> int:
        if self.resampled:  # a pair may come twice in an epoch: seed by stream position
            return hash((self.seed, epoch, self.rank, worker, position))
        return hash((self.seed, epoch, int(sample["__key__"])))  # as ImageTextPairs


class ShardLoader(DataLoader):
    """A DataLoader over :class:`ShardPairs` that sets the dataset's epoch on every ``iter()``.

    Lightning calls ``set_epoch`` only on a loader's sampler, and a DataLoader over an
    IterableDataset accepts none; ``epoch`` is read when each epoch's iterator is created
    (pass Lightning's, ``lambda: trainer.fit_loop.epoch_progress.current.processed``, the
    value it gives samplers).
    """

    def __init__(self, dataset: ShardPairs, *args, epoch: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(dataset, *args, **kwargs)
        self.epoch_source = epoch

    def __iter__(self):
        if self.epoch_source is not None:
            self.dataset.set_epoch(self.epoch_source())
        return super().__iter__()
