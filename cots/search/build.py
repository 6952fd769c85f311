"""Building and updating an index: list the source, keep unchanged rows, encode added and changed files, commit.

An update (``cots-index`` on a folder that holds an index) compares each file's fingerprint with the recorded one
(:mod:`cots.search.fingerprints`: size and mtime_ns, or sha256 with ``use_hash``) and

* keeps the rows of unchanged files, read from the previous embeddings (not re-encoded);
* re-encodes changed files, whose rows stay at their place (same id);
* drops the rows of files that are gone, or that no longer decode (their ids are taken by the rows after
  them, which move down by one per removed row);
* appends the rows of added files at the end, in source order (sorted paths for a folder).

So ids are stable except that a removal shifts the ids after it: a client that keeps ids across updates
should key on :attr:`Hit.path` instead. A file skipped before and unchanged since (undecodable, too large, empty)
is skipped again without being read. An index built with another model, from another root or with another
storage dtype is refused (ModelMismatch / SearchError); ``rebuild=True`` re-encodes everything instead.
"""

from __future__ import annotations

import collections
import datetime
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import cots
from cots.retriever import Retriever, UnreadableImage
from cots.search import FORMAT, FORMAT_VERSION, INDEX_FILE, ModelMismatch, SearchError
from cots.search import faiss_backend as faiss_kinds
from cots.search.fingerprints import Fingerprint, fingerprint, unchanged
from cots.search.layout import (
    DTYPES,
    GenerationWriter,
    check_folder,
    locked,
    next_generation,
    open_embeddings,
    read_info,
    read_json,
)
from cots.search.sources import Listing, list_source

COPY_ROWS = 65536  # previous rows copied at a time
# Reasons under which an unchanged file is not read again (the others are about the path, checked each time).
STICKY_REASONS = ("empty_file", "undecodable", "too_large")


@dataclass
class BuildReport:
    """What a build or update did. Row counts: ``added`` + ``changed`` = ``encoded`` rows went through the model,
    ``unchanged`` were kept, ``removed`` left the index; ``skipped``: {reason: files} not indexed now."""

    folder: Path
    count: int
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    other_files: int = 0
    seconds: float = 0.0
    mode: str = "new"  # "new", "update", "rebuild" (asked for), "rebuild (<why>)"
    info: dict = field(default_factory=dict)

    @property
    def encoded(self) -> int:
        return self.added + self.changed


@dataclass
class _Previous:
    """The committed index an update starts from."""

    info: dict
    paths: list[str]
    fingerprints: list[Fingerprint]
    skipped: dict[str, tuple[str, Fingerprint | None]]
    embeddings: np.ndarray


def build_index(
    model: str | Path | Retriever,
    source: str | Path,
    out: str | Path,
    *,
    image_root: str | Path | None = None,
    dtype: str = "float16",
    use_hash: bool = False,
    rebuild: bool = False,
    faiss: str | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> BuildReport:
    """Build the index of ``source`` (a folder or a manifest) in the folder ``out``, or update the one there.

    Args:
        model: a :class:`Retriever` or what ``cots.load`` reads (a checkpoint, an export folder).
        source, image_root: see :func:`cots.search.sources.list_source`.
        dtype: storage of the rows, ``"float16"`` (half the size; scored in float32) or ``"float32"``.
        use_hash: detect changes by sha256 instead of (size, mtime_ns).
        rebuild: encode every file again (another model, root or dtype; a new decoder).
        faiss: also store an approximate FAISS index (``"hnsw"`` or ``"ivf"``), ``"none"`` to drop a stored
            one; None keeps what the previous index had.
        batch_size: images per forward pass (default: the model's ``batch_size``).
        progress: a tqdm bar on stderr while encoding.
    Raises:
        SearchError (ModelMismatch: another model built ``out``); cots.load's errors for the model.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if faiss not in (None, "none", "hnsw", "ivf"):
        raise ValueError(f"faiss must be None, 'none', 'hnsw' or 'ivf', got {faiss!r}")
    folder = Path(out).absolute()
    check_folder(folder)
    listing = list_source(source, image_root)
    retriever = model if isinstance(model, Retriever) else cots.load(model)
    with locked(folder):
        previous = _read_previous(folder) if (folder / INDEX_FILE).exists() else None
        mode = "new" if previous is None else _mode(previous, retriever, listing, dtype, rebuild, folder)
        if not mode.startswith("update"):
            previous = None if previous is None else _Previous(previous.info, [], [], {}, previous.embeddings)
        faiss_kind = faiss or ((previous.info.get("faiss") or {}).get("kind") if previous else None) or "none"
        report = _update(folder, retriever, listing, previous, dtype, use_hash, faiss_kind, batch_size, progress, mode)
    report.seconds = time.perf_counter() - started
    return report


def _read_previous(folder: Path) -> _Previous:
    info = read_info(folder)
    paths = read_json(folder / info["files"]["paths"])
    recorded = read_json(folder / info["files"]["fingerprints"])
    skipped = {rel: (reason, Fingerprint.from_list(fp) if fp else None) for rel, reason, fp in recorded["skipped"]}
    fingerprints = [Fingerprint.from_list(fp) for fp in recorded["indexed"]]
    return _Previous(info, paths, fingerprints, skipped, open_embeddings(folder, info))


def _mode(previous: _Previous, retriever: Retriever, listing: Listing, dtype: str, rebuild: bool, folder) -> str:
    """``update``, or ``rebuild``; refuses an update that would mix models or roots."""
    if rebuild:
        return "rebuild"
    model = previous.info["model"]
    if model["checksum"] != retriever.checksum:
        raise ModelMismatch(
            f"{folder} was built with the model {model['model_id']} (checksum {model['checksum']}), not with "
            f"{retriever.model_id} (checksum {retriever.checksum}): their embeddings do not mix. "
            "Rebuild it with --rebuild, or write another index with --out."
        )
    if Path(previous.info["root"]) != listing.root:
        raise SearchError(
            f"{folder} indexes {previous.info['root']}, not {listing.root}: use another --out, or --rebuild"
        )
    if previous.info["dtype"] != dtype:
        return f"rebuild ({previous.info['dtype']} rows, {dtype} asked for)"
    return "update"


def _update(
    folder: Path,
    retriever: Retriever,
    listing: Listing,
    previous: _Previous | None,
    dtype: str,
    use_hash: bool,
    faiss_kind: str,
    batch_size: int | None,
    progress: bool,
    mode: str,
) -> BuildReport:
    """Scan the files, plan what to keep and what to encode, encode, write the new generation and commit it."""
    started = time.perf_counter()
    scanned_at_ns = time.time_ns()
    current, skipped = _scan(listing, use_hash)
    kept, to_encode = _plan(listing.files, current, skipped, previous, use_hash)
    new_rows = _encode(retriever, listing.root, to_encode, current, skipped, dtype, batch_size, progress)
    old_rows = {rel: i for i, rel in enumerate(previous.paths)} if previous else {}
    order = [rel for rel in old_rows if rel in kept or rel in new_rows]  # their previous places
    order += [rel for rel in to_encode if rel in new_rows and rel not in old_rows]  # added, in source order
    report = BuildReport(
        folder=folder,
        count=len(order),
        added=sum(rel not in old_rows for rel in new_rows),
        changed=sum(rel in old_rows for rel in new_rows),
        removed=sum(rel not in kept and rel not in new_rows for rel in old_rows),
        unchanged=len(kept),
        skipped=dict(sorted(collections.Counter(reason for reason, _ in skipped.values()).items())),
        other_files=listing.other_files,
        mode=mode,
    )
    writer = GenerationWriter(folder, next_generation(folder))
    rows = writer.embeddings(len(order), retriever.embed_dim, dtype)
    _fill(rows, order, old_rows, previous, new_rows)
    writer.write_json("paths", order)
    writer.write_json(
        "fingerprints",
        {
            "indexed": [current[rel].as_list() for rel in order],
            "skipped": [[rel, reason, fp.as_list() if fp else None] for rel, (reason, fp) in sorted(skipped.items())],
        },
    )
    faiss_spec = None
    if faiss_kind != "none":
        faiss_spec = faiss_kinds.plan(faiss_kind, len(order))
        faiss_kinds.save(faiss_kinds.build(rows, faiss_spec), writer.path("faiss"))
    del rows
    report.seconds = time.perf_counter() - started
    info = _info(retriever, listing, previous, report, dtype, use_hash, faiss_spec)
    report.info = writer.commit({**info, "scanned_at_ns": scanned_at_ns})
    return report


def _scan(listing: Listing, use_hash: bool) -> tuple[dict[str, Fingerprint], dict[str, tuple[str, Fingerprint | None]]]:
    """The fingerprint of each listed file, and the files skipped so far: {path: (reason, fingerprint or None)}."""
    skipped: dict[str, tuple[str, Fingerprint | None]] = {rel: (reason, None) for rel, reason in listing.skipped}
    current: dict[str, Fingerprint] = {}
    for rel in listing.files:
        try:
            current[rel] = found = fingerprint(listing.root / rel, use_hash)
        except FileNotFoundError:
            skipped[rel] = ("missing_file", None)
            continue
        except OSError:
            skipped[rel] = ("unreadable", None)
            continue
        if found.size == 0:
            skipped[rel] = ("empty_file", found)
    return current, skipped


def _plan(
    files: list[str],
    current: dict[str, Fingerprint],
    skipped: dict[str, tuple[str, Fingerprint | None]],
    previous: _Previous | None,
    use_hash: bool,
) -> tuple[set[str], list[str]]:
    """The indexed files whose rows are kept, and the files to encode (in source order).

    A file skipped before for its content (:data:`STICKY_REASONS`) and unchanged is added to ``skipped`` again.
    """
    if previous is None:
        return set(), [rel for rel in files if rel not in skipped]
    scan = previous.info.get("scanned_at_ns")
    kept = {
        rel
        for rel, recorded in zip(previous.paths, previous.fingerprints, strict=True)
        if rel in current and rel not in skipped and unchanged(recorded, current[rel], use_hash, scan)
    }
    to_encode = []
    for rel in files:
        if rel in kept or rel in skipped:
            continue
        reason, recorded = previous.skipped.get(rel, (None, None))
        if reason in STICKY_REASONS and recorded is not None and unchanged(recorded, current[rel], use_hash, scan):
            skipped[rel] = (reason, current[rel])
        else:
            to_encode.append(rel)
    return kept, to_encode


def _encode(
    retriever: Retriever,
    root: Path,
    to_encode: list[str],
    current: dict[str, Fingerprint],
    skipped: dict[str, tuple[str, Fingerprint | None]],
    dtype: str,
    batch_size: int | None,
    progress: bool,
) -> dict[str, np.ndarray]:
    """Rows of the files that decode (``dtype``, (D,) each); the others go into ``skipped`` with their reason."""
    rows: dict[str, np.ndarray] = {}
    batch_size = batch_size or retriever.batch_size
    with tqdm(total=len(to_encode), desc="encoding", unit="img", file=sys.stderr, disable=not progress) as bar:
        for start in range(0, len(to_encode), batch_size):
            names, images = [], []
            for rel in to_encode[start : start + batch_size]:
                try:
                    images.append(retriever.prepare_image(root / rel))
                    names.append(rel)
                except UnreadableImage as bad:
                    skipped[rel] = (bad.reason, current[rel] if bad.reason != "missing_file" else None)
            if images:
                embeddings = retriever.encode_images(torch.stack(images), batch_size=batch_size)
                rows.update(zip(names, embeddings.numpy().astype(dtype), strict=True))
            bar.update(len(to_encode[start : start + batch_size]))
    return rows


def _fill(rows: np.ndarray, order: list[str], old_rows: dict, previous: _Previous | None, new_rows: dict) -> None:
    """Write each row of ``order``: from ``new_rows`` when encoded now, else from the previous embeddings."""
    kept = [(i, old_rows[rel]) for i, rel in enumerate(order) if rel not in new_rows]
    for start in range(0, len(kept), COPY_ROWS):
        destination, source = map(list, zip(*kept[start : start + COPY_ROWS], strict=True))
        rows[destination] = previous.embeddings[source]
    fresh = [(i, new_rows[rel]) for i, rel in enumerate(order) if rel in new_rows]
    for start in range(0, len(fresh), COPY_ROWS):
        destination, values = zip(*fresh[start : start + COPY_ROWS], strict=True)
        rows[list(destination)] = np.stack(values)
    rows.flush()


def _info(retriever, listing, previous, report: BuildReport, dtype, use_hash, faiss_spec) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_record(retriever),
        "embed_dim": retriever.embed_dim,
        "count": report.count,
        "dtype": dtype,
        "root": str(listing.root),
        "source": {"kind": listing.kind, "path": str(listing.source)},
        "change_detection": "sha256" if use_hash else "size_mtime_ns",
        "skipped": report.skipped,
        "other_files": report.other_files,
        "faiss": faiss_spec,
        "last_update": {
            "added": report.added,
            "changed": report.changed,
            "removed": report.removed,
            "unchanged": report.unchanged,
            "encoded": report.encoded,
            "skipped": sum(report.skipped.values()),
            "mode": report.mode,
            "seconds": round(report.seconds, 3),
        },
        "created_at": previous.info["created_at"] if previous else now,
        "updated_at": now,
        "software": software_versions(),
    }


def model_record(retriever: Retriever) -> dict:
    """index.json's ``model``: where the rows come from."""
    return {
        "path": str(Path(retriever.source).resolve()),
        "model_id": retriever.model_id,
        "checksum": retriever.checksum,
        "dtype": retriever.dtype,
        "embed_dim": retriever.embed_dim,
    }


def software_versions() -> dict:
    versions = {}
    for name in ("cots", "torch", "numpy", "faiss-cpu"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions
