"""Tar shards as samples: reading from any sample on (seeking), and counting samples from the headers alone.

A *sample* is a run of consecutive members whose names share a key: WebDataset's rule, the
member ``dir/0001.seg.png`` has key ``dir/0001`` and extension ``seg.png`` (the basename is cut
at its first dot). Both ``cots-data shards`` and img2dataset write samples this way.
"""

from __future__ import annotations

import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from typing import IO

from cots.data.remote import is_remote, open_shard, opened_version
from cots.data.shard_index import ShardError, check_unchanged


def split_name(name: str) -> tuple[str, str]:
    """``dir/0001.seg.png`` -> (``dir/0001``, ``seg.png``)."""
    head, slash, tail = name.rpartition("/")
    stem, _, ext = tail.partition(".")
    return head + slash + stem, ext.lower()


def read_shard(
    url: str,
    skip: int = 0,
    take: int | None = None,
    record: dict | None = None,
    stride: int = 0,
    wanted: frozenset[str] | None = None,
    block_size: int | None = None,
) -> Iterator[dict]:
    """Samples ``skip`` .. ``skip + take`` of one tar as ``{"__key__": key, ext: bytes}``.

    The members before them are passed over by seeking: with ``record`` (the shard's index entry,
    :mod:`cots.data.shard_index`) the reader seeks straight to the header of sample
    ``stride * (skip // stride)`` and reads at most ``stride - 1`` headers; without, it walks the
    headers from the start. Only members whose extension is in ``wanted`` (None: all) are read.
    A remote shard whose size or ETag differs from ``record`` is refused when opened.
    """
    url = os.fspath(url)
    kwargs = {} if block_size is None else {"block_size": block_size}
    with open_shard(url, **kwargs) as file:
        if record is not None and is_remote(url):
            check_unchanged(url, record, opened_version(url, file))
        yield from _samples(file, url, skip, take, (record or {}).get("offsets"), stride, wanted)


def _samples(file: IO[bytes], url: str, skip: int, take: int | None, offsets, stride: int, wanted) -> Iterator[dict]:
    try:
        tar = tarfile.open(fileobj=file, mode="r:")
    except tarfile.ReadError as err:
        raise ShardError(f"{url}: not a readable tar ({err})") from None
    position, key, sample = -1, None, None
    if offsets and stride and skip >= stride:
        k = min(skip // stride, len(offsets) - 1)
        # TarFile reads its next header at `offset` (the attribute next() advances): start at sample k * stride.
        tar.offset, tar.firstmember = offsets[k], None
        position = k * stride - 1
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError as err:
            raise ShardError(f"{url}: unreadable after sample {position} ({err}); index it again") from None
        if member is None:
            break
        key_, ext = split_name(member.name)
        if key_ != key:
            if sample is not None:
                yield sample
            key, position = key_, position + 1
            if take is not None and position >= skip + take:
                return
            sample = {"__key__": key} if position >= skip else None
        if sample is not None and member.isfile() and (wanted is None or ext in wanted):
            sample[ext] = tar.extractfile(member).read()
    if sample is not None:
        yield sample


def scan_shard(file: IO[bytes], size: int, stride: int) -> dict:
    """Count the samples of an open tar from its headers (no member data is read).

    Returns:
        ``samples`` (complete ones), ``offsets`` (header offset of samples 0, stride, ...),
        ``members`` (count per extension), ``truncated`` (the file ends inside a member or
        before tar's end-of-archive blocks) and ``incomplete`` (1 when the sample at the cut was
        left out). In a truncated shard the last sample seen is not counted: members of it may
        be missing.
    """
    tar = tarfile.open(fileobj=file, mode="r:")
    samples, offsets, members = 0, [], Counter()
    key, truncated, end = None, False, 0
    while True:
        try:
            member = tar.next()
        except tarfile.ReadError:  # data cut short
            truncated = True
            break
        if member is None:
            break
        key_, ext = split_name(member.name)
        if key_ != key:  # the sample before is complete
            if key is not None:
                samples += 1
            if samples % stride == 0:
                offsets.append(member.offset)
            key = key_
        end = member.offset_data + (-(-member.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE)
        if member.offset_data + member.size > size:
            truncated = True
            break
        if member.isfile():
            members[ext] += 1
    # A whole tar ends with two zero blocks after the last member; a cut inside a header reads
    # like the end of the archive, so check that they are there.
    truncated = truncated or end + 2 * tarfile.BLOCKSIZE > size
    if key is not None and not truncated:
        samples += 1
    if len(offsets) > -(-samples // stride):  # the offset of a sample that was not counted
        offsets.pop()
    return {
        "samples": samples,
        "offsets": offsets,
        "members": dict(sorted(members.items())),
        "truncated": truncated,
        "incomplete": int(truncated and key is not None),
    }
