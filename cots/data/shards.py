"""Tar shards of image-caption pairs: ``cots-data shards``' own layout, and a streaming training set over any shards.

Layout of a ``cots-data shards`` folder (:func:`cots.prepare.shard_writer.write_shards`):

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

Any other WebDataset tars (img2dataset's ``00000.tar`` ... with ``<key>.jpg``, ``<key>.txt``,
``<key>.json``) are read in place once ``cots-data index-shards`` has counted their samples
(:mod:`cots.data.shard_index`); several sources mix with weights (:mod:`cots.data.sources`).

Reading (:class:`ShardPairs`): an epoch is one stream of samples (:mod:`cots.data.shard_stream`:
shards in a permutation seeded by (seed, epoch), sources interleaved). Rank r of W takes the
r-th block of L samples of it (L = per-rank samples rounded down to whole batches); within a
rank, DataLoader worker w of K takes a contiguous run of whole batches. The split is by sample
position, using the indexed counts, not by whole shards: shards of unequal size would give
ranks unequal numbers of batches (a DDP hang, or data dropped to avoid it), and any number of
shards works for any W x K. A worker opens only the shards its run overlaps, skipping members
by seeking (local files, or range reads of remote ones). Each rank yields exactly
``len(dataset)`` samples; the < W * batch_size left over are a different tail each epoch.
"""

from __future__ import annotations

import json
import multiprocessing
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from cots.data.crops import image_to_uint8
from cots.data.datasets import MAX_SUBSTITUTIONS, clean_caption
from cots.data.decode import Decoder
from cots.data.images import BadSample
from cots.data.shard_index import ShardError
from cots.data.shard_set import (
    FORMAT,
    INDEX_NAME,
    KEY_DIGITS,
    VERSION,
    ShardIndex,
    ShardSet,
    SourceShards,
    build_shard_set,
    load_shard_index,
)
from cots.data.shard_stream import EpochStream, resampled_samples
from cots.data.tar_reader import read_shard

TEXT_MEMBERS = ("txt", "json")

__all__ = [
    "FORMAT",
    "INDEX_NAME",
    "KEY_DIGITS",
    "VERSION",
    "ShardError",
    "ShardIndex",
    "ShardLoader",
    "ShardPairs",
    "buffer_shuffle",
    "load_shard_index",
    "read_shard",
    "shard_captions",
]


def _paths(shard_set_or_dir) -> ShardSet:
    return shard_set_or_dir if isinstance(shard_set_or_dir, ShardSet) else build_shard_set(shard_set_or_dir)


def _caption_of(sample: dict, source: SourceShards) -> str:
    """The cleaned caption of a raw sample ('' when missing or empty)."""
    field = source.source.members.caption_json_field
    if field is None:
        return clean_caption(sample.get(source.source.members.caption, b"").decode("utf-8", "replace"))
    try:
        value = json.loads(sample.get("json", b"{}"))
        for part in field.split("."):
            value = value.get(part) if isinstance(value, dict) else None
    except ValueError:
        return ""
    return clean_caption(value) if isinstance(value, str) else ""


def _caption_members(source: SourceShards) -> frozenset[str]:
    field = source.source.members.caption_json_field
    return frozenset({"json"} if field is not None else {source.source.members.caption})


def shard_captions(shards) -> list[str]:
    """Every non-empty caption of the shards, in sample-id order (a ``cots-data shards`` folder: in
    pair-index order, as ``ImageTextPairs.captions()`` lists them, less the pairs skipped at
    conversion), so that a tokenizer trained on them is the same on every path. Reads the caption
    members only."""
    shard_set = _paths(shards)
    captions = []
    for source in shard_set.sources:
        keyed = []
        for shard in source.shards:
            for sample in read_shard(
                shard.url, 0, shard.samples, shard.record, shard_set.stride, _caption_members(source)
            ):
                caption = _caption_of(sample, source)
                if caption:
                    keyed.append((sample["__key__"], caption))
        if source.keyed:
            keyed.sort()
        captions.extend(caption for _, caption in keyed)
    return captions


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
    ``{"image": transform(RGB), "caption": str, "index": int, "skipped": [reasons]}``.

    Epoch mode: every rank yields ``len(self)`` samples, a disjoint share of the epoch's stream
    (module docstring; :mod:`cots.data.shard_stream` says what an epoch is when sources are
    mixed); all ranks together see every sample of the epoch once, less a remainder smaller than
    one global batch. Resampled mode: each (rank, worker) draws shards with replacement, seeded by
    (seed, epoch, rank, worker), and yields its share of ``samples_per_epoch``.

    A sample that cannot be used (no image member, an image that does not decode, an empty
    caption) is replaced by the next usable one of the same worker (the last one at the end of
    its run) and its reason travels in ``skipped``, as in ImageTextPairs: counts per rank and
    worker never change, so ranks stay in step.

    Each worker's order is a function of (seed, epoch, rank, worker, W, K, batch_size), and a
    sample's crop of (seed, epoch, index, pass) as in ImageTextPairs (resampled: of its stream
    position). ``index`` is the sample id (:mod:`cots.data.shard_set`), or the pair index when
    the shards are one ``cots-data shards`` folder. Shuffling: shards by permutation, samples
    through a buffer of ``shuffle_buffer`` raw samples per worker (memory: that many encoded images).

    The epoch reaches DataLoader workers through shared memory, so :meth:`set_epoch` works
    with persistent workers; use :class:`ShardLoader` to have it called on each ``iter()``.

    Args:
        shards: a :class:`ShardSet`, or ``data.train_shards`` (a folder, pattern or list of sources).
        transform: PIL RGB image -> tensor.
        rank, world_size: this process and the number of processes.
        seed: base seed, identical on every rank.
        batch_size: B, samples per rank per step: ranks and workers yield whole batches.
        shuffle_buffer: raw samples per worker's shuffle buffer.
        resampled: draw shards with replacement instead of epochs over the data.
        samples_per_epoch: resampled mode: samples per epoch over all ranks (default: the
            number of samples in the shards).
        block_size: bytes per range request of remote shards (None: :data:`cots.data.remote.BLOCK_SIZE`).
        decoder: image bytes -> RGB (:class:`cots.data.decode.Decoder`; default: Pillow, as the manifest path).
        views: instead of ``transform``, ``views(image (3, H, W) uint8, key) -> dict`` for the token level:
            :class:`cots.data.token_datasets.OnlineViews` (the ViT crop, its dVAE view, the patch mask and
            the caption-mask seed, from the key's random streams, as the manifest path draws them).
    """

    def __init__(
        self,
        shards,
        transform: Callable,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        batch_size: int = 1,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        block_size: int | None = None,
        decoder: Decoder | None = None,
        views: Callable[[torch.Tensor, tuple[int, ...]], dict] | None = None,
    ) -> None:
        if samples_per_epoch is not None and not resampled:
            raise ShardError("samples_per_epoch applies to resampled mode only (an epoch is every sample once)")
        self.shard_set = _paths(shards)
        self.transform, self.rank, self.world_size, self.seed = transform, rank, world_size, seed
        self.batch_size, self.shuffle_buffer, self.resampled = batch_size, shuffle_buffer, resampled
        self.block_size = block_size
        self.decoder = decoder or Decoder()
        self.views = views
        # a cots-data shards folder read alone keeps its pair indices as `index`
        self.keyed = len(self.shard_set.sources) == 1 and self.shard_set.sources[0].keyed
        self.epoch_samples = len(EpochStream(self.shard_set, seed, 0))
        total = (samples_per_epoch or self.shard_set.num_samples) if resampled else self.epoch_samples
        self.samples_per_rank = total // (world_size * batch_size) * batch_size
        if self.samples_per_rank == 0:
            raise ShardError(
                f"{self.shard_set.summary()}: {total} samples per epoch are fewer than one global batch "
                f"({world_size} x {batch_size})"
            )
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
        return shard_captions(self.shard_set)

    def _worker_run(self, worker: int, workers: int) -> tuple[int, int]:
        """(first sample, samples) of this worker in the rank's epoch stream: whole batches."""
        batches = self.samples_per_rank // self.batch_size
        first = worker * (batches // workers) + min(worker, batches % workers)
        count = batches // workers + (worker < batches % workers)
        return first * self.batch_size, count * self.batch_size

    def _decode(self, sample: dict, draws: tuple[int, ...]) -> dict:
        """One item from a raw sample; ``draws`` (:meth:`_sample_key`) seeds its crop."""
        source = self.shard_set.sources[sample["__source__"]]
        key = sample["__key__"]
        caption = _caption_of(sample, source)
        if not caption:
            raise BadSample("empty_caption", key)
        if source.keyed:
            data = next((v for k, v in sample.items() if k not in TEXT_MEMBERS and not k.startswith("__")), None)
        else:
            data = next((sample[ext] for ext in source.source.members.image if ext in sample), None)
        if data is None:
            raise BadSample("missing_image", key)
        if self.views is not None:  # the token level's views: numpy streams of the key, as ImageTextTokenPairs
            rgb = self.decoder(data)
            rgb = rgb if isinstance(rgb, torch.Tensor) else image_to_uint8(rgb)
            item = self.views(rgb, tuple(k % 2**63 for k in draws))
        else:
            with torch.random.fork_rng(devices=[]):
                # The crop is a function of the sample. Only the CPU generator: fork_rng(devices=[])
                # restores no other (and torch.manual_seed costs ~1 ms in its wrappers).
                torch.default_generator.manual_seed(hash(draws) & 0x7FFF_FFFF_FFFF_FFFF)
                item = {"image": self.transform(self.decoder(data))}
        item.update(caption=caption, index=self._index(sample), skipped=[])
        if source.keyed and "json" in sample:  # the pair's image, for data.pair_groups=image
            item["image_id"] = int(json.loads(sample["json"]).get("image_index", -1))
        elif not source.keyed:
            item["image_id"] = sample["__id__"]  # one image per sample
        return item

    def _index(self, sample: dict) -> int:
        return int(sample["__key__"]) if self.keyed else sample["__id__"]

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
            raw = resampled_samples(self.shard_set, random.Random(f"resampled-{tag}"), count, None, self.block_size)
        else:
            start += self.rank * self.samples_per_rank
            raw = EpochStream(self.shard_set, self.seed, epoch, None, self.block_size).read(start, start + count)
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
                item = self._decode(sample, self._sample_key(sample, epoch, worker, position))
            except BadSample as bad:
                reasons.append(bad.reason)
                if len(reasons) >= MAX_SUBSTITUTIONS:
                    raise RuntimeError(
                        f"{len(reasons)} consecutive unusable samples in shards: {Counter(reasons)}"
                    ) from None
                continue
            yield from self._substitutes(item, reasons)
            yield item
            last, reasons = item, []
        if reasons:
            for sample in passed if last is None else ():
                try:
                    last = self._decode(sample, self._sample_key(sample, epoch, worker, -1))
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

    def _sample_key(self, sample: dict, epoch: int, worker: int, position: int) -> tuple[int, ...]:
        """What a sample's random draws are a function of (its crop: ``hash(key)``, as ImageTextPairs; the
        token level's views: numpy streams of the key, as ImageTextTokenPairs)."""
        if self.resampled:  # a pair may come twice in an epoch: seed by stream position
            return (self.seed, epoch, self.rank, worker, position)
        if sample["__repeat__"]:  # a later pass over a source with weight > 1: another crop
            return (self.seed, epoch, self._index(sample), sample["__repeat__"])
        return (self.seed, epoch, self._index(sample))  # as the manifest path


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

