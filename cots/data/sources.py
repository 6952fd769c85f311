"""``data.train_shards``: which tar shards a run reads, grouped into sources with mixing weights.

A *source* is one data set's shards (CC3M, SBU, CC12M, ...). ``data.train_shards`` is one
source or a list of them, each written as

* a folder: its ``*.tar`` in name order (a folder with ``shards.json`` is ``cots-data shards``
  output and keeps that layout's own index and keys);
* a glob: ``/d/cc3m/*.tar``;
* a brace list: ``/d/cc3m/{00000..00331}.tar`` (numeric ranges keep their zero padding) or
  ``/d/{cc3m,sbu}/{00000..00009}.tar`` (alternatives); braces expand before globbing;
* any of these on object storage: ``s3://``, ``gs://``, ``https://`` (:mod:`cots.data.remote`;
  folders and globs need a store that lists, so over plain HTTP give brace lists);
* several of these in one string separated by ``::`` (OpenCLIP's convention), one source;
* a mapping ``{shards: <any of the above or a list of them>, weight: 1.0, name: cc3m,
  image: [jpg, png], caption: txt | json:<field>}``; ``weight`` and the member names are
  optional and default to the run's (``data.members``).

``weight`` w_s scales how much of source s one epoch takes: round(w_s * N_s) of its N_s samples
(1: every sample once, 2: twice, 0.5: a seeded half that changes each epoch); see
:mod:`cots.data.shard_stream`.
"""

from __future__ import annotations

import glob
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cots.data.remote import is_remote, list_remote
from cots.data.shard_index import ShardError

OWN_INDEX = "shards.json"  # cots-data shards' index (cots.data.shards.INDEX_NAME)
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
CAPTION_MEMBER = "txt"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


class SourceError(ShardError):
    """A ``data.train_shards`` value that names no shards, or names them in a form not understood."""


@dataclass(frozen=True)
class Members:
    """Which tar members of a sample are its image and its caption.

    ``image``: extensions tried in order (``jpg`` for ``<key>.jpg``); the first present is the
    image. ``caption``: ``txt`` (the member ``<key>.txt``), any other extension, or
    ``json:<field>`` for a field of ``<key>.json`` (dots go into nested objects).
    """

    image: tuple[str, ...] = IMAGE_MEMBERS
    caption: str = CAPTION_MEMBER

    @classmethod
    def from_config(cls, value: Mapping | None, default: Members | None = None) -> Members:
        base = default or cls()
        if not value:
            return base
        unknown = set(value) - {"image", "caption"}
        if unknown:
            raise SourceError(f"data.members: unknown keys {sorted(unknown)} (image, caption)")
        image = value.get("image", base.image)
        image = (image,) if isinstance(image, str) else tuple(image)
        caption = str(value.get("caption", base.caption))
        if not image or not caption or caption == "json:":
            raise SourceError(f"data.members: image {image!r} and caption {caption!r} must not be empty")
        return cls(tuple(e.lower().lstrip(".") for e in image), caption)

    @property
    def caption_json_field(self) -> str | None:
        return self.caption[5:] if self.caption.startswith("json:") else None


@dataclass(frozen=True)
class Source:
    """One data set: its shard URLs (local paths or remote URLs, in reading order) and how to read them.

    ``own_index``: the folder's ``shards.json`` when the source is ``cots-data shards`` output.
    """

    name: str
    urls: tuple[str, ...]
    weight: float = 1.0
    members: Members = field(default_factory=Members)
    own_index: str | None = None


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b`` -> ``[a00b, a01b, a02b]``; ``{x,y}`` alternatives; nested by repetition.

    A numeric range is padded to the width of its wider written end when either is zero-padded.
    """
    match = _BRACE.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        lo_text, hi_text = numeric.groups()
        lo, hi = int(lo_text), int(hi_text)
        width = max(len(lo_text), len(hi_text)) if lo_text.startswith("0") or hi_text.startswith("0") else 0
        step = 1 if hi >= lo else -1
        choices = [f"{i:0{width}d}" for i in range(lo, hi + step, step)]
    elif "," in body:
        choices = body.split(",")
    else:  # a literal brace (no range, no alternatives)
        return [pattern[: match.end()] + rest for rest in expand_braces(pattern[match.end() :])]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [expanded for choice in choices for expanded in expand_braces(head + choice + tail)]


def _has_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def shard_urls(spec: str) -> tuple[list[str], str | None]:
    """(tar URLs in reading order, the ``shards.json`` path when ``spec`` is an own-layout folder).

    Raises:
        SourceError: nothing matched, with the pattern.
    """
    spec = spec.strip()
    if not spec:
        raise SourceError("an empty shard source")
    urls: list[str] = []
    own_index = None
    for part in (p.strip() for p in spec.split("::")):
        for pattern in expand_braces(part):
            if is_remote(pattern):
                urls.extend(list_remote(pattern) if _has_glob(pattern) or not pattern.endswith(".tar") else [pattern])
                continue
            path = Path(os.path.expanduser(pattern))
            if _has_glob(pattern):
                urls.extend(sorted(glob.glob(str(path))))
            elif path.is_dir():
                if (path / OWN_INDEX).is_file():
                    if len(expand_braces(part)) > 1 or "::" in spec:
                        raise SourceError(f"{path}: a cots-data shards folder is a source of its own")
                    own_index = str(path / OWN_INDEX)
                    continue
                urls.extend(sorted(str(p) for p in path.glob("*.tar")))
            else:
                urls.append(str(path))  # a plain file name: checked when indexed / opened
    if not urls and own_index is None:
        raise SourceError(f"{spec}: no .tar shards found")
    duplicates = sorted(u for u, n in Counter(urls).items() if n > 1)
    if duplicates:
        raise SourceError(f"{spec}: shards named twice: {duplicates[:3]}")
    return urls, own_index


def _source_name(spec: str, index: int) -> str:
    first = expand_braces(spec.split("::")[0])[0]
    parent = first.rstrip("/").rsplit("/", 2)
    name = parent[-1] if not first.endswith(".tar") and not _has_glob(parent[-1]) else parent[-2]
    return name or f"source{index}"


def parse_sources(value, members: Mapping | None = None) -> list[Source]:
    """``data.train_shards`` (str, mapping, or a list of them; OmegaConf containers too) -> sources.

    ``members``: ``data.members``, the default of every source.
    """
    default = Members.from_config(members)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise SourceError("data.train_shards is empty")
    items = [value] if isinstance(value, (str, os.PathLike, Mapping)) else list(value)
    sources = []
    for i, item in enumerate(items):
        item = os.fspath(item) if isinstance(item, os.PathLike) else item
        if isinstance(item, str):
            spec, weight, name, item_members = item, 1.0, None, None
        elif isinstance(item, Mapping):
            unknown = set(item) - {"shards", "weight", "name", "image", "caption"}
            if unknown or "shards" not in item:
                raise SourceError(f"data.train_shards[{i}]: keys shards (required), weight, name, image, caption")
            shards = item["shards"]
            spec = shards if isinstance(shards, str) else "::".join(str(s) for s in shards)
            weight, name = float(item.get("weight", 1.0)), item.get("name")
            item_members = {k: item[k] for k in ("image", "caption") if k in item}
        else:
            raise SourceError(f"data.train_shards[{i}]: {item!r} is neither a path pattern nor a mapping")
        if not weight > 0:
            raise SourceError(f"data.train_shards[{i}]: weight must be > 0, got {weight}")
        urls, own_index = shard_urls(spec)
        sources.append(
            Source(
                str(name or _source_name(spec, i)),
                tuple(urls),
                weight,
                Members.from_config(item_members, default),
                own_index,
            )
        )
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        sources = [Source(f"{s.name}#{i}", s.urls, s.weight, s.members, s.own_index) for i, s in enumerate(sources)]
    seen: dict[str, str] = {}
    for source in sources:
        for url in source.urls:
            if url in seen:
                raise SourceError(f"{url}: in two sources ({seen[url]} and {source.name})")
            seen[url] = source.name
    return sources


def as_plain(value):
    """OmegaConf containers -> dicts and lists (others unchanged), without importing omegaconf here."""
    if isinstance(value, Mapping):
        return {str(k): as_plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [as_plain(v) for v in value]
    return value
