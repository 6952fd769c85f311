"""The sample counts of tar shards that someone else wrote (img2dataset, WebDataset): ``cots-index.json``.

The exact split of an epoch over ranks and workers, and resuming in the middle of one, need
every shard's sample count before reading starts. ``cots-data index-shards SOURCE...``
(:mod:`cots.prepare.shard_indexer`) finds them by reading the tar headers, and writes them to
an index file:

* beside the shards, ``<folder>/cots-index.json`` (the *sidecar*), found by itself at training
  time; or
* anywhere with ``--out FILE`` (read-only or remote shards, or one index for several
  folders), then named at training time with ``data.train_shards_index=FILE`` (a list for
  several).

One file, JSON: ``{"format": "cots-shard-index", "version": 1, "stride": S, "shards": {KEY:
RECORD}}``. KEY is the shard's file name when it lies in the index's own folder, else its full
path or URL. RECORD: ``samples`` (complete samples: runs of members sharing a key), ``bytes``
and ``mtime_ns`` (local) or ``etag`` (remote) at indexing, ``offsets`` (byte offset of the
header of sample 0, S, 2S, ...: a reader starting at sample k seeks to the nearest one below
and reads at most S - 1 headers before it), ``members`` (count per extension), ``truncated``
and ``lost`` (a shard cut short: the samples after the last complete one are not counted),
optionally ``sha1`` (``--checksum``) and ``img2dataset`` (that shard's ``_stats.json``
counts: what failed to download or decode before the shard was written).

A shard whose size, mtime or ETag differs from its record is refused, by name, both when
indexing again (unless ``--refresh``) and when training starts (remote shards: when opened).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cots.data.remote import is_remote

INDEX_NAME = "cots-index.json"
INDEX_FORMAT = "cots-shard-index"
INDEX_VERSION = 1
STRIDE = 64


class ShardError(ValueError):
    """Shards that cannot be written or read as indexed; the message names the folder or file."""


def index_command(urls: list[str] | tuple[str, ...]) -> str:
    """The command that indexes these shards (for error messages)."""
    folders = sorted({url.rsplit("/", 1)[0] for url in urls})
    shown = " ".join(folders[:3]) + (" ..." if len(folders) > 3 else "")
    return f"cots-data index-shards {shown} (add --out FILE and data.train_shards_index=FILE if not writable)"


def sidecar_path(url: str) -> str:
    """Where the index of a shard lies by default: ``cots-index.json`` in the shard's folder."""
    if is_remote(url):
        return url.rsplit("/", 1)[0] + "/" + INDEX_NAME
    return str(Path(url).parent / INDEX_NAME)


def record_key(url: str, index_path: str) -> str:
    """The key of a shard in an index file: its name if it lies in the index's folder, else its URL."""
    folder = index_path.rsplit("/", 1)[0] if is_remote(index_path) else str(Path(index_path).resolve().parent)
    parent, _, name = (url if is_remote(url) else str(Path(url).resolve())).rpartition("/")
    return name if parent == folder else (url if is_remote(url) else str(Path(url).resolve()))


def key_url(key: str, index_path: str) -> str:
    """Inverse of :func:`record_key`."""
    if "/" in key:
        return key
    if is_remote(index_path):
        return index_path.rsplit("/", 1)[0] + "/" + key
    return str(Path(index_path).resolve().parent / key)


def empty_index(stride: int = STRIDE) -> dict:
    return {"format": INDEX_FORMAT, "version": INDEX_VERSION, "stride": stride, "shards": {}}


def read_index(path: str) -> dict | None:
    """The index at ``path`` (local or remote), None when there is none.

    Raises:
        ShardError: a file that is not a readable index of this version.
    """
    try:
        if is_remote(path):
            import fsspec

            with fsspec.open(path, "rt", encoding="utf-8") as f:
                text = f.read()
        else:
            text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        index = json.loads(text)
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: not JSON ({err}); delete it and index again") from None
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ShardError(f"{path}: not a {INDEX_FORMAT} v{INDEX_VERSION} file")
    return index


def write_index(path: str, index: dict) -> None:
    """Write atomically (temporary file + rename), so that an interrupted run leaves the last good one."""
    text = json.dumps(index, indent=None, separators=(",", ":"), sort_keys=True) + "\n"
    if is_remote(path):
        import fsspec

        with fsspec.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    Path(tmp).write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def find_records(urls: list[str] | tuple[str, ...], index_paths: list[str] | None) -> list[dict]:
    """The index record of each shard, from ``index_paths`` (``data.train_shards_index``) or the sidecars.

    Raises:
        ShardError: shards found in no index, naming the first of them and the command to index them.
    """
    paths = list(index_paths or [])
    if not paths:
        paths = sorted({sidecar_path(url) for url in urls})
    records: dict[str, dict] = {}
    for path in paths:
        index = read_index(path)
        if index is None:
            if index_paths:
                raise ShardError(f"data.train_shards_index: {path}: file not found")
            continue
        for key, record in index["shards"].items():
            records[key_url(key, path)] = record
    found, missing = [], []
    for url in urls:
        record = records.get(url if is_remote(url) else str(Path(url).resolve()))
        (missing.append(url) if record is None else found.append(record))
    if missing:
        raise ShardError(
            f"{len(missing)} of {len(urls)} shards are not indexed, e.g. {missing[0]}: run {index_command(missing)}"
        )
    return found


def changed(record: dict, version: dict) -> str | None:
    """What differs between a shard's record and its current version (None: unchanged)."""
    if record.get("bytes") != version.get("bytes"):
        return f"size {record.get('bytes')} -> {version.get('bytes')} bytes"
    for key in ("mtime_ns", "etag"):
        if key in version and record.get(key) is not None and record.get(key) != version[key]:
            return f"{key} {record.get(key)} -> {version[key]}"
    return None


def check_unchanged(url: str, record: dict, version: dict) -> None:
    """Raises ShardError naming the shard when it changed since it was indexed."""
    difference = changed(record, version)
    if difference:
        raise ShardError(
            f"{url}: changed since it was indexed ({difference}); the sample counts no longer hold. "
            f"Index it again: cots-data index-shards --refresh {url.rsplit('/', 1)[0]}"
        )
