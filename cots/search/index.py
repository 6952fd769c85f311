"""An index opened for reading: its rows (memory-mapped), its paths, its model, and safe id -> file resolution."""

from __future__ import annotations

import operator
from pathlib import Path

import numpy as np
import torch

from cots.search import INDEX_FILE, SearchError, UnsafePath
from cots.search.layout import open_embeddings, read_info, read_json
from cots.search.sources import is_safe_relative


class SearchIndex:
    """The on-disk index of :mod:`cots.search.layout`, read-only. Item ids are row numbers, ``0 .. count - 1``.

    Attributes:
        folder: the index folder. ``info``: its ``index.json``.
        root: the indexed root (absolute); ``paths[i]``: item i's path relative to it (POSIX separators).
        count, embed_dim, dtype: N, D, and the storage dtype (``"float16"`` or ``"float32"``).
        embeddings: (N, D) rows, L2-normalised, memory-mapped (read from disk as they are used).
        model_id, checksum, model_path: the model that encoded the rows (``model_path``: what ``cots.load`` read).
        skipped: {reason: count} of the files that are not indexed.
    """

    def __init__(self, folder: Path, info: dict, paths: list[str], embeddings: np.ndarray) -> None:
        self.folder = Path(folder)
        self.info = info
        self.paths = paths
        self.embeddings = embeddings
        self.root = Path(info["root"])
        self.count: int = int(info["count"])
        self.embed_dim: int = int(info["embed_dim"])
        self.dtype: str = info["dtype"]
        self.model_id: str = info["model"]["model_id"]
        self.checksum: str = info["model"]["checksum"]
        self.model_path: str | None = info["model"]["path"]
        self.skipped: dict[str, int] = dict(info.get("skipped", {}))
        self._real_root = self.root.resolve()
        self._ids: dict[str, int] | None = None

    @classmethod
    def open(cls, folder: str | Path) -> SearchIndex:
        """Read ``index.json`` and the paths, map the rows. Raises SearchError naming the file that is wrong."""
        folder = Path(folder)
        info = read_info(folder)
        paths_file = folder / info["files"]["paths"]
        paths = read_json(paths_file)
        if not isinstance(paths, list) or len(paths) != info["count"] or not all(isinstance(p, str) for p in paths):
            raise SearchError(f"{paths_file} is not a list of {info['count']} paths, as {INDEX_FILE} says")
        return cls(folder, info, paths, open_embeddings(folder, info))

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"SearchIndex({self.folder}: {self.count} images under {self.root}, {self.model_id}, {self.dtype})"

    def check_id(self, item_id: int) -> int:
        """``item_id`` as an int in ``0 .. count - 1``; IndexError otherwise (TypeError for a non-integer)."""
        if isinstance(item_id, bool):
            raise TypeError("an item id is an integer, not a bool")
        number = operator.index(item_id)
        if not 0 <= number < self.count:
            raise IndexError(f"no item {number} in the index {self.folder} (ids 0 to {self.count - 1})")
        return number

    def resolve(self, item_id: int) -> Path:
        """The absolute path of item ``item_id``, symlinks resolved; always a path under :attr:`root`.

        The file may have been removed since it was indexed (opening it then raises FileNotFoundError).
        Raises:
            IndexError: an id outside ``0 .. count - 1`` (TypeError: not an integer).
            UnsafePath: the stored path, or a symlink on its way, leads outside the root.
        """
        rel = self.paths[self.check_id(item_id)]
        if not is_safe_relative(rel):
            raise UnsafePath(f"item {item_id} of {self.folder} has the path {rel!r}, which is not under the root")
        path = (self._real_root / rel).resolve()
        if not path.is_relative_to(self._real_root):
            raise UnsafePath(f"item {item_id} ({rel}) resolves to {path}, outside the indexed root {self._real_root}")
        return path

    def id_of(self, path: str) -> int:
        """The id of a relative path as stored in :attr:`paths` (KeyError when it is not indexed)."""
        if self._ids is None:
            self._ids = {rel: i for i, rel in enumerate(self.paths)}
        return self._ids[path]

    def vectors(self, ids) -> torch.Tensor:
        """Stored rows of ``ids`` as float32: (len(ids), D)."""
        ids = [self.check_id(i) for i in ids]
        return torch.from_numpy(np.asarray(self.embeddings[ids], dtype=np.float32))
