"""``cots-data index-shards``: count the samples of WebDataset tars in place (img2dataset output included).

Reads tar headers only (no member data, nothing decoded), in parallel processes, and writes
``cots-index.json`` (:mod:`cots.data.shard_index`): beside the shards by default, or one file
given with ``--out``. Resumable: the index is rewritten (atomically) every few seconds, and a
re-run keeps every shard whose size and mtime (ETag) still match its record and scans the
rest. A shard that changed since it was indexed is refused by name unless ``--refresh`` (or,
with ``--checksum``, when its content is unchanged: a copy that lost its mtime).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from cots.data.remote import is_remote, open_shard, shard_version
from cots.data.shard_index import (
    STRIDE,
    ShardError,
    changed,
    empty_index,
    read_index,
    record_key,
    sidecar_path,
    write_index,
)
from cots.data.sources import shard_urls
from cots.data.tar_reader import scan_shard

SAVE_EVERY_S = 5.0
# Remote scans read the shard in large blocks: with samples of tens of kB, reading only the headers would cost
# a request per sample, where a few sequential 8 MiB reads fetch the whole shard at the link's speed.
SCAN_BLOCK = 8 << 20
IMG2DATASET_STATS = ("count", "successes", "failed_to_download", "failed_to_resize")


def content_sha1(url: str) -> str:
    digest = hashlib.sha1()
    with open_shard(url) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _img2dataset_stats(url: str) -> dict | None:
    """The counts of img2dataset's ``<shard>_stats.json`` beside the shard, if there is one."""
    path = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
    if path is None:
        return None
    try:
        if is_remote(path):
            import fsspec

            with fsspec.open(path, "rt") as f:
                stats = json.load(f)
        else:
            stats = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return {k: stats[k] for k in IMG2DATASET_STATS if isinstance(stats.get(k), int)} or None


def scan_one(url: str, stride: int, checksum: bool) -> dict:
    """The index record of one shard (runs in a worker process)."""
    version = shard_version(url)
    # Local: unbuffered, so that each header costs one 512-byte read and member data is never read.
    with open(url, "rb", buffering=0) if not is_remote(url) else open_shard(url, SCAN_BLOCK) as f:
        try:
            record = scan_shard(f, version["bytes"], stride)
        except Exception as err:  # tarfile raises several types on garbage
            raise ShardError(f"{url}: not a readable tar ({err})") from None
    if shard_version(url) != version:
        raise ShardError(f"{url}: changed while it was being indexed")
    record.update(version, stride=stride)
    if checksum:
        record["sha1"] = content_sha1(url)
    stats = _img2dataset_stats(url)
    if stats:
        record["img2dataset"] = stats
    return record


def _plan(specs: list[str], out: str | None) -> dict[str, list[str]]:
    """Index file -> the shard URLs it holds."""
    plan: dict[str, list[str]] = {}
    for spec in specs:
        urls, own_index = shard_urls(spec)
        if own_index is not None:
            raise ShardError(f"{spec}: a cots-data shards folder ({own_index} holds its counts): nothing to index")
        for url in urls:
            plan.setdefault(out or sidecar_path(url), []).append(url)
    for path in plan:
        folder = os.path.dirname(path) or "."
        if not is_remote(path) and not os.access(folder, os.W_OK):
            raise ShardError(f"{folder}: not writable; write the index elsewhere with --out FILE")
    return plan


def index_shards(
    specs: list[str],
    out: str | None = None,
    workers: int = 1,
    checksum: bool = False,
    refresh: bool = False,
    stride: int = STRIDE,
    log: Callable[[str], None] = print,
) -> dict:
    """Index the shards of ``specs`` (folders, globs, brace lists, URLs); returns a summary.

    Raises:
        ShardError: a changed shard (without ``refresh``), an unreadable tar, an unwritable folder.
    """
    start = time.monotonic()
    plan = _plan(specs, os.path.abspath(out) if out and not is_remote(out) else out)
    summary = Counter()
    truncated: list[str] = []
    for path, urls in plan.items():
        index = read_index(path) or empty_index(stride)
        records = index["shards"]
        todo, problems = [], []
        for url in urls:
            key = record_key(url, path)
            record = records.get(key)
            if record is None:
                todo.append(url)
                continue
            version = shard_version(url)
            difference = changed(record, version)
            if difference is None:
                summary["kept"] += 1
            elif record.get("sha1") and record["bytes"] == version["bytes"] and content_sha1(url) == record["sha1"]:
                record.update(version)  # same content, new mtime (a copy): keep the counts
                summary["kept"] += 1
            elif refresh:
                todo.append(url)
            else:
                problems.append(f"{url} ({difference})")
        if problems:
            raise ShardError(
                f"{len(problems)} shards changed since they were indexed in {path}: {'; '.join(problems[:3])}. "
                "Re-run with --refresh to count them again"
            )
        last_save = time.monotonic()
        with ProcessPoolExecutor(max(1, workers)) as pool:
            futures = {pool.submit(scan_one, url, stride, checksum): url for url in todo}
            for future in as_completed(futures):
                url = futures[future]
                records[record_key(url, path)] = future.result()
                summary["scanned"] += 1
                if time.monotonic() - last_save > SAVE_EVERY_S:
                    write_index(path, index)
                    last_save = time.monotonic()
        write_index(path, index)
        for url in urls:
            record = records[record_key(url, path)]
            summary["samples"] += record["samples"]
            summary["bytes"] += record["bytes"]
            for key, value in (record.get("img2dataset") or {}).items():
                summary[f"img2dataset_{key}"] += value
            if record.get("truncated"):
                truncated.append(url)
        log(f"wrote {path} ({len(urls)} shards)")
    seconds = time.monotonic() - start
    scanned_samples = summary["samples"] if not summary["kept"] else None
    return {
        "shards": sum(len(u) for u in plan.values()),
        "scanned": summary["scanned"],
        "kept": summary["kept"],
        "samples": summary["samples"],
        "bytes": summary["bytes"],
        "truncated": truncated,
        "img2dataset": {k[len("img2dataset_") :]: v for k, v in summary.items() if k.startswith("img2dataset_")},
        "seconds": seconds,
        "shards_per_s": summary["scanned"] / seconds if seconds else None,
        "samples_per_s": scanned_samples / seconds if scanned_samples is not None and seconds else None,
        "index_files": list(plan),
    }
