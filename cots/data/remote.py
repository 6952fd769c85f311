"""Opening shards wherever they are: local files, or ``s3://``, ``gs://``, ``http(s)://`` through fsspec.

Remote shards are read with HTTP range requests (fsspec's buffered files): opening costs one
request for the size, and reading from a sample in the middle of a shard fetches the blocks
from there on, never the bytes before it. ``s3://`` needs ``pip install s3fs``, ``gs://``
``pip install gcsfs``; ``http(s)://`` needs only ``aiohttp`` (``pip install -e .[webdata]``).

A shard's *version* is what tells whether it changed since it was indexed: size and mtime (in
nanoseconds) of a local file; size and the store's ETag (or md5 / generation / last-modified,
whatever the store reports) of a remote one.
"""

from __future__ import annotations

import os
from typing import IO

REMOTE_SCHEMES = ("s3://", "gs://", "gcs://", "http://", "https://")
# Bytes per range request: several samples of a few tens of kB each, so that a sequential read
# costs one request per block, and a start in the middle of a shard skips the bytes before it.
BLOCK_SIZE = 1 << 20
_VERSION_KEYS = ("ETag", "etag", "md5Hash", "generation", "LastModified", "last_modified", "updated")


class RemoteError(OSError):
    """A remote shard that cannot be listed or opened; the message names the URL and the cause."""


def is_remote(url) -> bool:
    """True for ``s3://``, ``gs://``, ``http(s)://`` URLs; False for local paths (str or Path)."""
    return isinstance(url, str) and url.startswith(REMOTE_SCHEMES)


def _filesystem(url: str):
    try:
        import fsspec
    except ImportError as err:  # fsspec comes with lightning; this is a broken install
        raise RemoteError(f"{url}: remote shards need fsspec (pip install -e .[webdata])") from err
    try:
        return fsspec.core.url_to_fs(url)[0]
    except (ImportError, ValueError) as err:
        scheme = url.split("://")[0]
        package = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}[scheme]
        raise RemoteError(f"{url}: {scheme}:// needs the package {package} (pip install {package}): {err}") from err


def list_remote(pattern: str) -> list[str]:
    """The ``.tar`` URLs under a remote folder or matching a remote glob, sorted."""
    fs = _filesystem(pattern)
    scheme = pattern.split("://")[0]
    try:
        if any(c in pattern for c in "*?["):
            paths = fs.glob(pattern)
        else:
            paths = [p for p in fs.ls(pattern, detail=False) if str(p).endswith(".tar")]
    except Exception as err:  # each store raises its own types
        raise RemoteError(f"{pattern}: cannot list ({err}); give the shards as a brace list instead") from err
    return sorted(p if "://" in p else f"{scheme}://{p}" for p in paths)


def shard_version(url: str) -> dict:
    """``{"bytes": size, "mtime_ns": ...}`` of a local file, ``{"bytes": size, "etag": ...}`` of a remote one.

    Raises:
        FileNotFoundError: a local file that is not there.
        RemoteError: a remote one that cannot be reached.
    """
    if not is_remote(url):
        stat = os.stat(url)
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        info = _filesystem(url).info(url)
    except RemoteError:
        raise
    except Exception as err:
        raise RemoteError(f"{url}: cannot read its size ({err})") from err
    return {"bytes": int(info["size"]), "etag": _etag(info)}


def _etag(info: dict) -> str | None:
    value = next((info[k] for k in _VERSION_KEYS if info.get(k) is not None), None)
    return None if value is None else str(value)


def open_shard(url: str, block_size: int = BLOCK_SIZE) -> IO[bytes]:
    """A seekable binary file of the shard (remote: range reads of ``block_size`` bytes)."""
    if not is_remote(url):
        return open(url, "rb")  # noqa: SIM115 (the caller closes it)
    try:
        return _filesystem(url).open(url, "rb", block_size=block_size, cache_type="readahead")
    except RemoteError:
        raise
    except Exception as err:
        raise RemoteError(f"{url}: cannot open ({err})") from err


def opened_version(url: str, file: IO[bytes]) -> dict:
    """The version of an open shard, as :func:`shard_version` gives it, without another request when remote."""
    if not is_remote(url):
        stat = os.fstat(file.fileno())
        return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    details = dict(getattr(file, "details", None) or {})
    if _etag(details) is None:  # an HTTP file keeps only its size: ask once more (a HEAD request)
        return shard_version(url)
    return {"bytes": int(details.get("size") or file.size), "etag": _etag(details)}
