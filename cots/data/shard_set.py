"""The shards of a run with their sample counts: the sources of ``data.train_shards``, resolved and checked.

Two kinds of source: ``cots-data shards`` folders (their ``shards.json`` holds the counts; the
layout is described in :mod:`cots.data.shards`) and any other WebDataset tars, img2dataset's
included, whose counts come from ``cots-index.json`` (:mod:`cots.data.shard_index`).

Every sample of the run has a *sample id*: sources in the order given, shards in the order
listed, samples in file order, numbered from 0. It seeds the sample's crop and is its
``index`` (except in a ``cots-data shards`` folder read alone, where ``index`` stays the pair
index of the source manifest, as :class:`~cots.data.datasets.ImageTextPairs` numbers it).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from cots.data.remote import is_remote, shard_version
from cots.data.shard_index import STRIDE, ShardError, check_unchanged, find_records
from cots.data.sources import Members, Source, parse_sources

INDEX_NAME = "shards.json"
FORMAT = "cots-shards"
VERSION = 1
KEY_DIGITS = 10


@dataclass(frozen=True)
class ShardIndex:
    """The shards of a finished ``cots-data shards`` conversion: paths and sample counts, in file order."""

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
        raise ShardError(
            f"{shard_dir}: no {INDEX_NAME}: not a shard folder, or its conversion did not finish "
            "(re-run cots-data shards)"
        )
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise ShardError(f"{path}: not a {FORMAT} v{VERSION} index")
    paths = tuple(shard_dir / s["name"] for s in info["shards"])
    for shard, p in zip(info["shards"], paths, strict=True):
        if not p.is_file() or p.stat().st_size != shard["bytes"]:
            raise ShardError(f"{p}: missing or changed since {path} was written (re-run cots-data shards)")
    return ShardIndex(paths, tuple(s["samples"] for s in info["shards"]), info)


@dataclass(frozen=True)
class Shard:
    """One tar: where it is, how many samples it holds, its id range, and its index record (None: own layout)."""

    url: str
    samples: int
    first_id: int
    record: dict | None = None


@dataclass(frozen=True)
class SourceShards:
    """A source with its shards. ``keyed``: a ``cots-data shards`` folder (keys are pair indices)."""

    source: Source
    shards: tuple[Shard, ...]
    keyed: bool

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass(frozen=True)
class ShardSet:
    """All sources of a run, in order; ``stride``: the offsets' spacing in the index records."""

    sources: tuple[SourceShards, ...]
    stride: int = STRIDE

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.sources)

    @property
    def shards(self) -> list[Shard]:
        return [shard for source in self.sources for shard in source.shards]

    def fingerprint(self) -> str:
        """Changes with any shard, count, weight or order: a checkpoint's data position holds only for the same."""
        parts = [(s.source.name, s.source.weight, [(x.url, x.samples) for x in s.shards]) for s in self.sources]
        return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]

    def summary(self) -> str:
        lines = []
        for s in self.sources:
            truncated = [x for x in s.shards if x.record and x.record.get("truncated")]
            note = f", {len(truncated)} truncated shards (counted up to the cut)" if truncated else ""
            lines.append(
                f"{s.source.name}: {s.num_samples} samples in {len(s.shards)} shards, weight {s.source.weight:g}{note}"
            )
        return "; ".join(lines)


def build_shard_set(train_shards, members=None, index_paths=None, check: bool = True) -> ShardSet:
    """Resolve ``data.train_shards`` into shards with counts (``data.members``, ``data.train_shards_index``).

    ``check``: compare every local shard with its index record now (remote ones are compared
    when a worker opens them).

    Raises:
        ShardError: an unindexed, missing or changed shard, by name; an empty source.
    """
    sources = parse_sources(train_shards, members)
    if isinstance(index_paths, str):
        index_paths = [index_paths]
    resolved, first_id = [], 0
    stride = None
    for source in sources:
        if source.own_index is not None:
            own = load_shard_index(Path(source.own_index).parent)
            shards = []
            for path, count in zip(own.paths, own.counts, strict=True):
                shards.append(Shard(str(path), count, first_id))
                first_id += count
            resolved.append(SourceShards(source, tuple(shards), keyed=True))
            continue
        try:
            records = find_records(source.urls, index_paths)
        except ShardError as err:
            if all(re.fullmatch(r"shard-\d{6}\.tar", url.rsplit("/", 1)[-1]) for url in source.urls):
                raise ShardError(
                    f"{err}; or, if this is cots-data shards output, its conversion did not finish "
                    f"(no {INDEX_NAME}: re-run cots-data shards)"
                ) from None
            raise
        shards = []
        for url, record in zip(source.urls, records, strict=True):
            if check and not is_remote(url):
                try:
                    version = shard_version(url)
                except FileNotFoundError:
                    raise ShardError(f"{url}: indexed, but the file is gone") from None
                check_unchanged(url, record, version)
            shards.append(Shard(url, int(record["samples"]), first_id, record))
            first_id += int(record["samples"])
            stride = stride or record.get("stride")
        if not sum(s.samples for s in shards):
            raise ShardError(f"source {source.name}: its {len(shards)} shards hold no complete sample")
        resolved.append(SourceShards(source, tuple(shards), keyed=False))
    return ShardSet(tuple(resolved), int(stride or STRIDE))


__all__ = ["FORMAT", "INDEX_NAME", "KEY_DIGITS", "VERSION", "Members", "Shard", "ShardError", "ShardIndex", "ShardSet"]
