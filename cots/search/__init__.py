"""Image search over a folder or a manifest: ``cots-index`` builds an index, ``cots-search`` queries it.

The Python API (what ``cots-search`` and a web page use)::

    from cots.search import Searcher

    searcher = Searcher("indexes/emoji")                # the model recorded in index.json, exact search
    hits = searcher.text("a red heart", k=10)           # [Hit(id, path, score), ...], best first
    hits = searcher.image("query.png", k=10)            # a path, a PIL image or the bytes of an image file
    hits = searcher.neighbours(hits[0].id, k=10)        # "more like this", from the stored embedding
    file = searcher.index.resolve(hits[0].id)           # absolute path, always inside searcher.index.root

The index is a folder (every file but ``index.json`` carries its generation number, see :mod:`cots.search.layout`)::

    index.json                  what the index is (schema: cots.search.layout.describe); written last, atomically
    embeddings-<gen>.npy        (N, D) float16 or float32, L2-normalised rows; row i is item id i (memory-mapped)
    paths-<gen>.json            N paths relative to the indexed root, POSIX separators; entry i is item id i
    fingerprints-<gen>.json     (size, mtime_ns, sha256) of each indexed file and of each skipped one, for updates
    faiss-<gen>.index           only with ``cots-index --faiss hnsw|ivf``: the approximate FAISS index of the rows

Only this module's constants and exceptions are imported with the package (no torch, no numpy); the names of
the API below are imported when first used.
"""

from __future__ import annotations

import importlib

FORMAT = "cots-search-index"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"

# Extensions indexed in a folder (lower-cased); other files are counted in index.json's ``other_files``.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


class SearchError(RuntimeError):
    """An index that cannot be built, opened or queried; the message names the folder or file."""


class ModelMismatch(SearchError):
    """Queries (or an update) from a model other than the one that built the index; names both models."""


class UnsafePath(SearchError):
    """An indexed path that would resolve outside the indexed root (``..``, absolute, or a symlink leading out)."""


class MissingFaiss(SearchError, ImportError):
    """The FAISS back end was asked for and ``faiss`` is not installed (``pip install -e .[faiss]``)."""


_LAZY = {
    "Searcher": "cots.search.searcher",
    "Hit": "cots.search.searcher",
    "SearchIndex": "cots.search.index",
    "build_index": "cots.search.build",
    "BuildReport": "cots.search.build",
}


def __getattr__(name: str):
    """``from cots.search import Searcher`` imports the torch-heavy module only then."""
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cots.search' has no attribute {name!r}")
