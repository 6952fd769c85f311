"""Image-text retrieval metrics (METHOD §8), scored tile by tile under a memory budget.

Scores are dot products of separately computed embeddings. Both directions are counted in one pass over the
image-caption score matrix, one cache-sized tile at a time (:mod:`cots.metrics.ranking`), so memory stays
bounded at any test-set size and the matrix product is computed once. Ranks are exact and ties never favour
the ground truth: a candidate that scores exactly as the ground truth is counted as ahead of it with the
probability of a random order, so Recall@K is its expectation over random tie-breaks (a collapsed model
scores chance). By default the tile height follows from a memory budget (see :func:`rows_per_chunk`).

Across DDP ranks (``across_ranks=True``) each rank scores a contiguous share of the blocks of images against
every caption; the image-side counts are gathered and the caption-side counts summed, so every rank gets the
table of one process, to the last bit (every score comes from a product of the same shape either way).
"""

from __future__ import annotations

import torch

from cots import distributed
from cots.metrics import ranking
from cots.metrics.ranking import QueryRanks, Tiling, TwoWayPass, hit_probability, same_scores

__all__ = [
    "METRIC_KEYS",
    "QueryRanks",
    "chance_table",
    "format_table",
    "hit_probability",
    "image_to_text_ranks",
    "ranks_both_ways",
    "recall_table",
    "retrieval_metrics",
    "rows_per_chunk",
    "text_to_image_ranks",
]

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "rsum")
RECALL_KS = (1, 5, 10)
DEFAULT_MEMORY_BUDGET_MB = 512.0


def rows_per_chunk(
    gallery_size: int, element_size: int, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, workers: int = 1
) -> int:
    """Images per tile: as many as fit ``memory_budget_mb`` with ``workers`` tiles at once, at most ``TILE_ROWS``.

    A tile of c rows holds c x ``TILE_COLUMNS`` scores (fewer for a smaller gallery) of ``element_size``
    bytes, and for the rows (or columns) whose counts can change a copy of them, their comparison (bool)
    and its int64 sum (``2 * element_size + 9`` bytes per entry in all). Not counted: O(images + captions)
    vectors. More rows than ``TILE_ROWS`` would not make the products faster and push the tile out of cache.
    """
    bytes_per_row = min(max(gallery_size, 1), ranking.TILE_COLUMNS) * (2 * element_size + 9) * max(workers, 1)
    return max(1, min(ranking.TILE_ROWS, int(memory_budget_mb * 2**20) // bytes_per_row))


def tiling(
    num_images: int,
    texts: torch.Tensor,
    chunk_size: int | None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    workers: int = 1,
) -> Tiling:
    """The tiles of the (images x captions) matrix: ``chunk_size`` images high, or as the budget allows."""
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
    rows = chunk_size or rows_per_chunk(texts.shape[0], texts.element_size(), memory_budget_mb, workers)
    return Tiling.of(num_images, texts.shape[0], rows)


@torch.no_grad()
def ranks_both_ways(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    limit: int | None = None,
    *,
    across_ranks: bool = False,
) -> tuple[QueryRanks, QueryRanks]:
    """Where the ground truth of each image (its best caption) and of each caption (its image) stands.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (M, D) caption embeddings.
        text_to_image: (M,) long, the image index of each caption.
        chunk_size: images per tile (peak memory about chunk_size x TILE_COLUMNS x 17 bytes for fp32, per worker);
            None derives it from ``memory_budget_mb``.
        memory_budget_mb: bound on one tile's temporaries when ``chunk_size`` is None.
        limit: count ``better`` exactly only below this (enough for R@K, K <= limit); None: exact ranks.
        across_ranks: every rank passes the same gallery and scores its share of the images (collective).
    Returns:
        (image->text :class:`QueryRanks` of N queries, text->image :class:`QueryRanks` of M queries).
    """
    if image_emb.shape[0] == 0 or text_emb.shape[0] == 0:  # nothing to score: no image is found
        nothing = torch.zeros(image_emb.shape[0], dtype=torch.long, device=image_emb.device)
        return QueryRanks(nothing, nothing, nothing), QueryRanks.cat([], text_emb.device)
    workers = ranking.worker_count(text_emb.device)
    grid = tiling(image_emb.shape[0], text_emb, chunk_size, memory_budget_mb, workers)
    share = distributed.share(grid.num_blocks) if across_ranks else (0, grid.num_blocks)
    gather = distributed.all_gather_varlen if across_ranks else _local
    counts = TwoWayPass(image_emb, text_emb, text_to_image, grid, range(*share), limit, workers)
    thresholds = gather(counts.ground_truth())  # M pairs, in image order: the shares in rank order
    for attempt in range(2):
        counts.set_thresholds(thresholds)
        counts.run()
        observed = gather(counts.observed)
        if same_scores(observed, thresholds):  # the same on every rank: all hold both vectors
            break
        if attempt == 1:
            raise RuntimeError("the score tiles change from one product to the next: ranks are not reproducible")
        thresholds = observed  # the products disagreed with the tiles: count again against the tiles' scores
    row_counts = gather(counts.row_counts)  # N x 2
    column_counts = distributed.all_reduce_sum(counts.column_counts) if across_ranks else counts.column_counts
    i2t = QueryRanks.from_counts(*row_counts.unbind(1), gather(counts.row_positives), limit)
    found = torch.isfinite(counts.column_threshold).long()  # a NaN or infinite score is never found
    t2i = QueryRanks.from_counts(*column_counts.unbind(1), found, limit)
    return i2t, t2i


def _local(x: torch.Tensor) -> torch.Tensor:
    return x


def image_to_text_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    limit: int | None = None,
) -> QueryRanks:
    """Where the best ground-truth caption of each image stands (found when any caption is): N queries.

    Arguments as in :func:`ranks_both_ways` (which counts both directions in the same pass).
    """
    return ranks_both_ways(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb, limit)[0]


def text_to_image_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    limit: int | None = None,
) -> QueryRanks:
    """Where the ground-truth image of each caption stands: M queries. Arguments as in :func:`ranks_both_ways`."""
    return ranks_both_ways(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb, limit)[1]


def recall_table(i2t_ranks: QueryRanks, t2i_ranks: QueryRanks, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent both ways (expected over random orders of tied candidates), their mean and sum (rsum)."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * hit_probability(ranks, k).mean().item() if len(ranks) else float("nan")
    values = [out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in ks]
    out["rsum"] = sum(values)
    out["r_mean"] = out["rsum"] / len(values)
    return out


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    *,
    across_ranks: bool = False,
) -> dict[str, float]:
    """The full table (keys ``METRIC_KEYS``) for one gallery; tiling as in :func:`ranks_both_ways`.

    With ``across_ranks`` every rank must call it with the same gallery: each scores its share and every rank
    returns the table one process computes. Without it the call is local (safe on one rank of a DDP job).
    """
    limit = max(RECALL_KS)  # R@1/5/10 need exact counts of better candidates below 10 only
    ranks = ranks_both_ways(
        image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb, limit, across_ranks=across_ranks
    )
    return recall_table(*ranks, ks=RECALL_KS)


def chance_table(num_images: int, captions_per_image: float) -> dict[str, float]:
    """Expected R@K of random scores, for reading a table next to chance level."""
    out = {}
    for k in (1, 5, 10):
        # i2t: at least one of c ground-truth captions among the top k of M = c*N.
        m, c = num_images * captions_per_image, captions_per_image
        miss = 1.0
        for j in range(k):
            miss *= max(m - c - j, 0) / max(m - j, 1)
        out[f"i2t_r{k}"] = 100.0 * (1.0 - miss)
        out[f"t2i_r{k}"] = 100.0 * min(k / num_images, 1.0)
    out["rsum"] = sum(out.values())
    out["r_mean"] = out["rsum"] / 6
    return out


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """A markdown table, one row per named result."""
    head = "| | " + " | ".join(METRIC_KEYS) + " |\n|---|" + "---:|" * len(METRIC_KEYS)
    lines = [head] + [
        f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.2f}" for k in METRIC_KEYS) + " |"
        for name, row in rows.items()
    ]
    return "\n".join(lines)
