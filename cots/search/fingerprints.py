"""How an update tells a changed file from an unchanged one.

By default a file is unchanged when its size in bytes and its modification time in nanoseconds
(``os.stat``: ``st_size``, ``st_mtime_ns``) equal those recorded when it was indexed. That reads no file content,
so an update over an unchanged folder costs one ``stat`` per file; it misses an edit that keeps both (a copy
with ``cp -p`` or ``rsync -t`` of other content of the same size). ``--hash`` (``use_hash=True``) compares the
sha256 of the content instead: every file is read, a ``touch`` no longer re-encodes, and no edit is missed. A
file recorded without a hash (indexed without ``--hash``) counts as unchanged under ``--hash`` when its size and
mtime are, and its hash is recorded then.

The fingerprint is taken before the file is decoded: a file edited while it is read is re-encoded next time.
Timestamps are as fine as the file system keeps them (ext4: a kernel tick, a few ms; FAT: 2 s), so a same-size
rewrite just after a scan could keep its recorded mtime. As git does with its index ("racily clean" entries), a
file whose recorded mtime is within ``RACY_MARGIN_NS`` of the previous scan's start counts as changed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

HASH_BLOCK = 1 << 20  # bytes read at a time
RACY_MARGIN_NS = 2_000_000_000  # mtimes this close to the previous scan's start are not trusted


@dataclass(frozen=True)
class Fingerprint:
    size: int  # bytes
    mtime_ns: int  # st_mtime_ns
    sha256: str | None = None  # hex, when hashed

    def as_list(self) -> list:
        return [self.size, self.mtime_ns, self.sha256]

    @classmethod
    def from_list(cls, value: list) -> Fingerprint:
        size, mtime_ns, sha256 = value
        return cls(int(size), int(mtime_ns), sha256)


def fingerprint(path: str | Path, use_hash: bool = False) -> Fingerprint:
    """The file's fingerprint. Raises OSError (FileNotFoundError when it is gone)."""
    stat = os.stat(path)
    return Fingerprint(stat.st_size, stat.st_mtime_ns, sha256_of(path) if use_hash else None)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def unchanged(recorded: Fingerprint, current: Fingerprint, use_hash: bool, scanned_at_ns: int | None = None) -> bool:
    """Whether ``current`` is the file ``recorded`` describes (see the module docstring).

    ``scanned_at_ns``: when the scan that recorded ``recorded`` started (``time.time_ns()``); None trusts any mtime.
    """
    if use_hash and recorded.sha256 is not None:
        return recorded.sha256 == current.sha256
    if scanned_at_ns is not None and recorded.mtime_ns >= scanned_at_ns - RACY_MARGIN_NS:
        return False
    return (recorded.size, recorded.mtime_ns) == (current.size, current.mtime_ns)
