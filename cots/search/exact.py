"""Exact top-k by inner product, over the gallery in chunks whose temporaries fit a memory budget.

The gallery (N, D) may be a memory-mapped float16 or float32 array: each chunk of rows is read, converted to
float32 and multiplied by the queries, and only the best ``k`` of each query are kept between chunks, so the
largest temporary is a (Q x chunk) score block, never (Q x N), and the gallery is never loaded whole.

Order: scores descending; equal scores (ties) by ascending id. This is exact, also when a tie straddles the
k-th place or a chunk boundary. A NaN score ranks last.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

DEFAULT_MEMORY_BUDGET_MB = 256.0


def rows_per_chunk(num_queries: int, dim: int, element_size: int, memory_budget_mb: float) -> int:
    """Gallery rows scored at once so that one chunk's temporaries fit ``memory_budget_mb`` (MB = 2^20 bytes).

    Per gallery row: its float32 copy (4 D bytes; none for a float32 gallery, counted anyway), the rows read from
    the file (``element_size`` D, page cache), and per query a float32 score, a bool and the int64 count made
    from it (13 bytes). Not counted: the queries and the kept top-k, O(Q (D + k)).
    """
    bytes_per_row = dim * (4 + element_size) + 13 * max(num_queries, 1)
    return max(1, int(memory_budget_mb * 2**20) // bytes_per_row)


@torch.no_grad()
def top_k(
    queries: torch.Tensor,
    gallery: np.ndarray | torch.Tensor,
    k: int,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best gallery rows of each query by dot product.

    Args:
        queries: (Q, D) float32.
        gallery: (N, D) float16 or float32; a NumPy array (memory-mapped or not) or a CPU tensor.
        k: results per query; fewer when N < k.
        memory_budget_mb: bound on one chunk's temporaries, when ``chunk_rows`` is None.
        chunk_rows: gallery rows per chunk (overrides the budget; for tests).
    Returns:
        scores (Q, min(k, N)) float32 and ids (Q, min(k, N)) int64, each row best first, ties by ascending id.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    queries = queries.float()
    num_queries, num_rows = queries.shape[0], gallery.shape[0]
    rows = chunk_rows or rows_per_chunk(num_queries, gallery.shape[1], _element_size(gallery), memory_budget_mb)
    best_scores = torch.empty(num_queries, 0)
    best_ids = torch.empty(num_queries, 0, dtype=torch.long)
    for start in range(0, num_rows, rows):
        block = _float32_rows(gallery, start, min(start + rows, num_rows))  # c x D
        scores = queries @ block.t()  # Q x c
        del block
        scores.nan_to_num_(nan=float("-inf"))
        chunk_scores, chunk_ids = _block_top_k(scores, k)
        del scores  # before the next block is allocated: one block at a time
        best_scores, best_ids = _best_first(
            torch.cat([best_scores, chunk_scores], dim=1), torch.cat([best_ids, chunk_ids + start], dim=1), k
        )
    return best_scores, best_ids


def _element_size(gallery: np.ndarray | torch.Tensor) -> int:
    return gallery.element_size() if isinstance(gallery, torch.Tensor) else gallery.dtype.itemsize


def _float32_rows(gallery: np.ndarray | torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` as a float32 tensor (a view when they already are float32)."""
    block = gallery[start:stop]
    if isinstance(block, np.ndarray):
        with warnings.catch_warnings():  # a read-only memory map: the tensor is only read
            warnings.simplefilter("ignore", UserWarning)
            block = torch.from_numpy(block)
    return block.float()


def _block_top_k(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's ``k`` best columns of a (Q, c) block, ties at the k-th place resolved to the lowest columns.

    ``torch.topk`` picks any of the columns tied at the k-th score; the rows where more columns reach that
    score than fit (rare with real embeddings) are redone with the lowest tied columns.
    """
    k = min(k, scores.shape[1])
    values, columns = scores.topk(k, dim=1)
    threshold = values[:, -1:]
    reaching = (scores >= threshold).sum(dim=1)
    for row in (reaching > k).nonzero().flatten().tolist():
        above = (scores[row] > threshold[row]).nonzero().flatten()
        tied = (scores[row] == threshold[row]).nonzero().flatten()[: k - above.numel()]
        columns[row] = torch.cat([above, tied])
        values[row] = scores[row, columns[row]]
    return values, columns


def _best_first(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row of (Q, m) candidates: score descending, then id ascending (two stable sorts)."""
    ids, by_id = ids.sort(dim=1, stable=True)
    scores = scores.gather(1, by_id)
    scores, by_score = scores.sort(dim=1, descending=True, stable=True)
    ids = ids.gather(1, by_score)
    return scores[:, :k], ids[:, :k]


class ExactBackend:
    """:func:`top_k` over fixed gallery rows (a :class:`cots.search.index.SearchIndex`'s memory map)."""

    def __init__(self, gallery: np.ndarray | torch.Tensor, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> None:
        self.gallery = gallery
        self.memory_budget_mb = memory_budget_mb

    def top_k(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return top_k(queries, self.gallery, k, self.memory_budget_mb)
