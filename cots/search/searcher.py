"""Searcher: text, image and "more like this" queries against an index, with the model that built it.

    searcher = Searcher("indexes/emoji")                 # model: the one index.json records
    searcher.text("a red heart", k=5)                   # [Hit(id=812, path='google/2764-fe0f.png', score=0.52), ...]
    searcher.image(open("q.png", "rb").read(), k=5)     # a path, a PIL image or the bytes of an image file
    searcher.neighbours(812, k=5)                       # the nearest stored rows, the item itself left out
    searcher.index.resolve(812)                         # the file, absolute, never outside searcher.index.root

Scores are dot products of L2-normalised embeddings (cosines, in [-1, 1]), best first; the exact back end orders
equal scores by id. Nothing changes after construction, so the methods can serve concurrent requests.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

import cots
from cots.data.images import BadSample, load_rgb
from cots.retriever import Retriever, UnreadableImage
from cots.search import ModelMismatch, SearchError
from cots.search import faiss_backend as faiss_kinds
from cots.search.exact import DEFAULT_MEMORY_BUDGET_MB, ExactBackend
from cots.search.index import SearchIndex

BACKENDS = ("exact", "faiss")
ImageQuery = str | Path | Image.Image | bytes


@dataclass(frozen=True)
class Hit:
    """One result: the item ``id`` (a row of the index), its ``path`` relative to the index root, its ``score``."""

    id: int
    path: str
    score: float

    def as_dict(self) -> dict:
        return asdict(self)


class Searcher:
    """Queries an index (:class:`SearchIndex`) with the model that built it.

    Args:
        index_path: the index folder (``cots-index --out``).
        model: a :class:`Retriever`, or a path for ``cots.load``; None loads the model index.json records.
        backend: ``"exact"`` (chunked matrix product over the memory-mapped rows, bounded memory) or ``"faiss"``
            (the approximate index ``cots-index --faiss`` stored, else an exact ``IndexFlatIP`` built in memory;
            needs ``pip install -e .[faiss]``).
        device: where a loaded model runs.
        memory_budget_mb: bound on the exact back end's temporaries per query batch.
    Raises:
        SearchError: no index there, or the recorded model is gone; ModelMismatch: ``model`` is not the model
        that built the index (the message names both); MissingFaiss: ``backend="faiss"`` without faiss.
    """

    def __init__(
        self,
        index_path: str | Path,
        model: str | Path | Retriever | None = None,
        backend: str = "exact",
        *,
        device: str = "cpu",
        memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.index = SearchIndex.open(index_path)
        self.model = self._model(model, device)
        self.backend = backend
        self._backend = self._make_backend(backend, memory_budget_mb)

    def __repr__(self) -> str:
        return f"Searcher({self.index!r}, backend={self.backend})"

    # -- queries -----------------------------------------------------------------------------------
    def text(self, query: str, k: int = 10) -> list[Hit]:
        """The ``k`` images that best match a caption."""
        return self.texts([query], k)[0]

    def texts(self, queries: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """:meth:`text` for several captions, encoded and scored as one batch."""
        return self.search_vectors(self.model.encode_texts(list(queries)), k)

    def image(self, item: ImageQuery, k: int = 10) -> list[Hit]:
        """The ``k`` images nearest to a query image: a path, a PIL image, or the bytes of an image file.

        Raises:
            UnreadableImage: a path or bytes that do not decode (``.reason`` as in the data layer).
        """
        if isinstance(item, (bytes, bytearray, memoryview)):
            try:
                item = load_rgb(io.BytesIO(bytes(item)))  # the same guards as files (decompression bombs)
            except BadSample as bad:
                raise UnreadableImage("<image bytes>", bad.reason) from None
        return self.search_vectors(self.model.encode_images([item]), k)[0]

    def neighbours(self, item_id: int, k: int = 10) -> list[Hit]:
        """The ``k`` items nearest to item ``item_id``'s stored embedding, the item itself left out.

        Raises:
            IndexError: no such id.
        """
        number = self.index.check_id(item_id)
        hits = self.search_vectors(self.index.vectors([number]), k + 1)[0]
        return [hit for hit in hits if hit.id != number][:k]

    def search_vectors(self, queries: torch.Tensor, k: int = 10) -> list[list[Hit]]:
        """The ``k`` best items for each of (Q, D) query embeddings (L2-normalised, as the model gives them)."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if queries.ndim != 2 or queries.shape[1] != self.index.embed_dim:
            raise ValueError(f"queries must be (Q, {self.index.embed_dim}), got {tuple(queries.shape)}")
        scores, ids = self._backend.top_k(queries.float(), k)
        paths = self.index.paths
        return [
            [Hit(i, paths[i], s) for s, i in zip(row_scores, row_ids, strict=True) if i >= 0]
            for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=True)
        ]

    # -- set-up ------------------------------------------------------------------------------------
    def _model(self, model: str | Path | Retriever | None, device: str) -> Retriever:
        if model is None:
            recorded = self.index.model_path
            if recorded is None or not Path(recorded).exists():
                raise SearchError(
                    f"{self.index.folder} was built with {self.index.model_id} from {recorded}, which is not there: "
                    "pass the model (--model / Searcher(..., model=path))"
                )
            model = recorded
        retriever = model if isinstance(model, Retriever) else cots.load(model, device=device)
        if retriever.checksum != self.index.checksum:
            raise ModelMismatch(
                f"the index {self.index.folder} was built with the model {self.index.model_id} (checksum "
                f"{self.index.checksum}); {retriever.model_id} (checksum {retriever.checksum}) embeds differently. "
                f"Search with {self.index.model_id}, or rebuild the index with this model (cots-index --rebuild)."
            )
        return retriever

    def _make_backend(self, backend: str, memory_budget_mb: float):
        if backend == "exact":
            return ExactBackend(self.index.embeddings, memory_budget_mb)
        stored = self.index.info.get("faiss")
        if stored:
            index = faiss_kinds.load(self.index.folder / self.index.info["files"]["faiss"])
            return faiss_kinds.FaissBackend(index, stored)
        spec = faiss_kinds.plan("flat", self.index.count)
        return faiss_kinds.FaissBackend(faiss_kinds.build(self.index.embeddings, spec), spec)
