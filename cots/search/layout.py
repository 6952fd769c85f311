"""The index folder on disk: its file names, ``index.json``, and writing one generation of it atomically.

Every build or update writes a new *generation*: ``embeddings-<gen>.npy``, ``paths-<gen>.json``,
``fingerprints-<gen>.json`` (and ``faiss-<gen>.index``) under new names, flushed to disk, and only then
``index.json``, which names them, through a temporary file and ``os.replace``. Until that rename the previous
``index.json`` and its files are untouched, so an interrupted build (Ctrl-C, ``kill -9``, a full disk) leaves the
previous index usable; the files of older or unfinished generations are removed by the next build. A process
that opened the previous generation keeps reading it (its memory map survives the removal on POSIX). One build
at a time: a second ``cots-index`` on the same folder stops with an error (``fcntl.flock`` on ``.lock``).

``index.json`` (``format_version`` 1)::

    format, format_version  "cots-search-index", 1
    generation              the number in the data file names
    files                   {"embeddings", "paths", "fingerprints", "faiss"}: file names (faiss: null without one)
    model                   {"path", "model_id", "checksum", "dtype", "embed_dim"}: what encoded the rows
                            (``cots.load`` path, absolute; checksum: sha256 of the float32 encoder weights)
    embed_dim, count, dtype D, N, and the storage dtype of the rows ("float16" or "float32"); rows L2-normalised
    root                    the indexed root, absolute; every path is relative to it and resolves under it
    source                  {"kind": "folder" | "manifest", "path": the folder or manifest, absolute}
    change_detection        "size_mtime_ns" or "sha256" (see cots.search.fingerprints)
    scanned_at_ns           when this build started to stat the files (time.time_ns())
    skipped                 {reason: count} of files not indexed (missing_file, empty_file, undecodable,
                            too_large, outside_root, duplicate); the files are in fingerprints-<gen>.json
    other_files             files in the folder that are not images by extension (not read)
    faiss                   null, or {"kind", "factory", "search_params"} of faiss-<gen>.index
    last_update             {"added", "changed", "removed", "unchanged", "encoded", "skipped", "mode", "seconds"}
    created_at, updated_at  ISO 8601 UTC
    software                {"cots", "torch", "numpy", "faiss"} versions
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cots.search import FORMAT, FORMAT_VERSION, INDEX_FILE, SearchError

LOCK_FILE = ".lock"
EXTENSIONS = {"embeddings": "npy", "paths": "json", "fingerprints": "json", "faiss": "index"}
GENERATION_FILE = re.compile(r"^(embeddings|paths|fingerprints|faiss)-(\d+)\.(npy|json|index)(\.tmp)?$")
DTYPES = ("float16", "float32")


def data_file_name(kind: str, generation: int) -> str:
    return f"{kind}-{generation:06d}.{EXTENSIONS[kind]}"


def read_info(folder: str | Path) -> dict:
    """``index.json`` of an index folder, checked for its format and version. Raises SearchError naming it."""
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        raise SearchError(f"no search index at {folder} (missing {INDEX_FILE}; cots-index builds one)")
    info = read_json(path)
    found = info.get("format") if isinstance(info, dict) else type(info).__name__
    if found != FORMAT:
        raise SearchError(f"{path} is not a COTS search index (format {found!r})")
    if info.get("format_version") != FORMAT_VERSION:
        raise SearchError(
            f"{path} has format_version {info.get('format_version')!r}; this version of cots reads {FORMAT_VERSION} "
            "(rebuild it with cots-index --rebuild)"
        )
    return info


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SearchError(f"cannot read {path}: {err}") from err


def open_embeddings(folder: Path, info: dict) -> np.ndarray:
    """The (N, D) rows, memory-mapped read-only (nothing is read until a row is used)."""
    path = Path(folder) / info["files"]["embeddings"]
    try:
        rows = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise SearchError(f"cannot read {path} (truncated or corrupt?): {err}") from err
    expected = (info["count"], info["embed_dim"])
    if rows.shape != expected or rows.dtype != np.dtype(info["dtype"]):
        raise SearchError(f"{path} holds {rows.shape} {rows.dtype}; {INDEX_FILE} says {expected} {info['dtype']}")
    return rows


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's build lock (created with the folder); SearchError when another build holds it."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SearchError(f"another cots-index is writing {folder}; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_folder(folder: Path) -> None:
    """Refuse to write into a folder that holds files of something other than an index."""
    if folder.exists() and not folder.is_dir():
        raise SearchError(f"{folder} exists and is not a folder")
    if not folder.is_dir() or (folder / INDEX_FILE).exists():
        return
    foreign = [p.name for p in folder.iterdir() if p.name != LOCK_FILE and not GENERATION_FILE.match(p.name)]
    if foreign:
        raise SearchError(f"{folder} is not empty and holds no {INDEX_FILE} (found {sorted(foreign)[0]}): not an index")


class GenerationWriter:
    """Writes one generation's data files under their final names, then commits ``index.json`` last."""

    def __init__(self, folder: Path, generation: int) -> None:
        self.folder = Path(folder)
        self.generation = generation
        self.files: dict[str, str | None] = {kind: None for kind in EXTENSIONS}

    def path(self, kind: str) -> Path:
        self.files[kind] = data_file_name(kind, self.generation)
        return self.folder / self.files[kind]

    def embeddings(self, count: int, dim: int, dtype: str) -> np.memmap:
        """An (N, D) array of ``dtype`` mapped onto ``embeddings-<gen>.npy``, to fill; flushed by :meth:`commit`."""
        return np.lib.format.open_memmap(self.path("embeddings"), mode="w+", dtype=np.dtype(dtype), shape=(count, dim))

    def write_json(self, kind: str, value) -> None:
        with open(self.path(kind), "w", encoding="utf-8") as file:
            json.dump(value, file, separators=(",", ":"))
            file.flush()
            os.fsync(file.fileno())

    def commit(self, info: dict) -> dict:
        """Flush the data files, replace ``index.json`` (atomic), then remove every other generation's files.

        Returns ``info`` as written, with ``generation`` and ``files`` added.
        """
        for name in self.files.values():
            if name is not None:
                _fsync(self.folder / name)
        info = {**info, "generation": self.generation, "files": dict(self.files)}
        tmp = self.folder / f"{INDEX_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as file:
            json.dump(info, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, self.folder / INDEX_FILE)
        _fsync(self.folder)
        remove_other_generations(self.folder, keep=set(self.files.values()))
        return info


def next_generation(folder: Path) -> int:
    """One more than any generation number in the folder (a committed one or the leftovers of an interrupted one)."""
    numbers = (
        [int(m.group(2)) for p in folder.iterdir() if (m := GENERATION_FILE.match(p.name))] if folder.is_dir() else []
    )
    return max(numbers, default=0) + 1


def remove_other_generations(folder: Path, keep: set) -> None:
    for path in folder.iterdir():
        if GENERATION_FILE.match(path.name) and path.name not in keep:
            path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
