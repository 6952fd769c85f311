"""The optional FAISS back end (``pip install -e .[faiss]``, the ``faiss-cpu`` wheel); imported only when asked for.

Kinds (all by inner product, which is the cosine for the L2-normalised rows):

* ``flat``: ``IndexFlatIP``, exact; holds a float32 copy of the rows in memory (4 N D bytes). Ties are not
  ordered by id (FAISS's heap decides), otherwise it ranks as :mod:`cots.search.exact`.
* ``hnsw``: ``HNSW32,Flat``: a graph of M = 32 links per node, ``efConstruction`` 80, searched with
  ``efSearch`` 64. Approximate; built in minutes per million rows.
* ``ivf``: ``IVF<nlist>,Flat``: ``nlist`` = round(sqrt(N)) k-means cells (trained on at most 50 rows per cell),
  searched in the ``nprobe`` = 16 nearest. Approximate; quick to build.

``cots-index --faiss hnsw|ivf`` stores the approximate index beside the rows (``faiss-<gen>.index``, rebuilt at
each update); ``Searcher(backend="faiss")`` reads it, or builds ``flat`` in memory when the index has none.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cots.search import MissingFaiss

KINDS = ("flat", "hnsw", "ivf")
ADD_ROWS = 65536  # rows converted to float32 and added at a time
HNSW_LINKS, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 64
IVF_NPROBE, IVF_TRAIN_ROWS_PER_CELL = 16, 50


def import_faiss():
    """The ``faiss`` module, or :class:`MissingFaiss` saying how to install it."""
    try:
        import faiss
    except ImportError as err:
        raise MissingFaiss(f"the FAISS back end needs the faiss-cpu package ({err}): pip install -e .[faiss]") from err
    return faiss


def plan(kind: str, count: int) -> dict:
    """``{"kind", "factory", "search_params"}`` of an index of ``kind`` over ``count`` rows (index.json's ``faiss``)."""
    if kind == "flat":
        return {"kind": kind, "factory": "Flat", "search_params": {}}
    if kind == "hnsw":
        return {"kind": kind, "factory": f"HNSW{HNSW_LINKS},Flat", "search_params": {"efSearch": HNSW_EF_SEARCH}}
    if kind == "ivf":
        nlist = max(1, round(math.sqrt(count)))
        return {"kind": kind, "factory": f"IVF{nlist},Flat", "search_params": {"nprobe": min(IVF_NPROBE, nlist)}}
    raise ValueError(f"unknown FAISS index kind {kind!r}; one of {', '.join(KINDS)}")


def build(embeddings: np.ndarray, spec: dict):
    """A FAISS index of the (N, D) rows (float16 or float32, memory-mapped or not) as ``spec`` (:func:`plan`) says.

    The rows are added ``ADD_ROWS`` at a time as float32, so the build never holds a second copy of a memory map.
    """
    faiss = import_faiss()
    count, dim = embeddings.shape
    index = faiss.index_factory(dim, spec["factory"], faiss.METRIC_INNER_PRODUCT)
    if spec["kind"] == "hnsw":
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    if not index.is_trained:
        index.cp.min_points_per_centroid = 1  # small indexes: no warning, fewer rows than 39 per cell are fine
        nlist = index.nlist
        sample = np.linspace(0, count - 1, num=min(count, nlist * IVF_TRAIN_ROWS_PER_CELL)).astype(np.int64)
        index.train(np.ascontiguousarray(embeddings[sample], dtype=np.float32))
    for start in range(0, count, ADD_ROWS):
        index.add(np.ascontiguousarray(embeddings[start : start + ADD_ROWS], dtype=np.float32))
    return index


def save(index, path) -> None:
    import_faiss().write_index(index, str(path))


def load(path):
    return import_faiss().read_index(str(path))


class FaissBackend:
    """Top-k through a FAISS index (:func:`build` or :func:`load`), with ``spec["search_params"]`` applied."""

    def __init__(self, index, spec: dict) -> None:
        faiss = import_faiss()
        self.index = index
        self.spec = spec
        for name, value in spec.get("search_params", {}).items():
            faiss.ParameterSpace().set_index_parameter(index, name, value)

    def top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q, D) float32 queries -> scores (Q, k') float32, ids (Q, k') int64, k' = min(k, N), best first.

        An approximate index can find fewer than k' rows for a query; those places hold id -1 (score -inf).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        k = min(k, self.index.ntotal)
        if k == 0:
            return torch.empty(queries.shape[0], 0), torch.empty(queries.shape[0], 0, dtype=torch.long)
        scores, ids = self.index.search(np.ascontiguousarray(queries.float().numpy()), k)
        scores = torch.from_numpy(scores)
        ids = torch.from_numpy(ids)
        return scores.masked_fill(ids < 0, float("-inf")), ids
