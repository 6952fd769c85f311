"""Image-text retrieval metrics (METHOD §8) with chunked scoring.

Scores are dot products of separately computed embeddings. Only a
(chunk x gallery) block of scores exists at any time, so memory stays bounded
at any test-set size. Ranks are exact and ties never favour the ground truth: a candidate that
scores exactly as the ground truth is counted as ahead of it with the probability of a random
order, so Recall@K is its expectation over random tie-breaks (a collapsed model scores chance).
By default the chunk size follows from a memory budget for the block and its
temporaries (see :func:`rows_per_chunk`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "rsum")
DEFAULT_MEMORY_BUDGET_MB = 512.0
COUNT_BLOCK = 8192  # gallery columns compared at once


def rows_per_chunk(gallery_size: int, element_size: int, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB) -> int:
    """Query rows scored at once so that one chunk's temporaries fit ``memory_budget_mb``.

    A chunk of c rows holds a (c x gallery) score block of ``element_size`` bytes per entry; the
    comparisons that count better candidates run on (c x COUNT_BLOCK) slices of it, as a bool
    and its int64 sum (9 bytes per entry). Not counted: O(c + gallery) vectors and whatever the
    matmul itself packs (O(gallery x D)).
    """
    bytes_per_row = max(gallery_size, 1) * element_size + min(max(gallery_size, 1), COUNT_BLOCK) * 9
    return max(1, int(memory_budget_mb * 2**20) // bytes_per_row)


@dataclass
class QueryRanks:
    """Where each query's ground truth stands among its candidates, ties kept apart.

    ``better``: candidates that are not ground truth and score strictly above the best ground truth.
    ``tied``: candidates that are not ground truth and score exactly as the best ground truth.
    ``positives``: ground-truth candidates at that best score (1 for t2i; 0 when a query has no
    ground truth or its score is not finite, which counts as never found).
    All (Q,) long. A tie never favours the ground truth: recall is the expectation over a random
    order of the tied candidates (:func:`hit_probability`), so a collapsed model scores chance level.
    """

    better: torch.Tensor
    tied: torch.Tensor
    positives: torch.Tensor

    @classmethod
    def cat(cls, parts: list[QueryRanks], device: torch.device | None = None) -> QueryRanks:
        if not parts:
            empty = torch.zeros(0, dtype=torch.long, device=device)
            return cls(empty, empty, empty)
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in ("better", "tied", "positives")))

    def __len__(self) -> int:
        return self.better.shape[0]


def hit_probability(ranks: QueryRanks, k: int) -> torch.Tensor:
    """P(a ground truth is among the top ``k``) per query, tied candidates in random order: (Q,) float64.

    The ``tied`` negatives and ``positives`` ground truths share ``k - better`` remaining places;
    a miss means the first ``k - better`` of the tied block are all negatives:
    prod_{i < k - better} (tied - i) / (tied + positives - i).
    """
    slots = (k - ranks.better).clamp_min(0)
    tied, positives = ranks.tied.double(), ranks.positives.double()
    miss = torch.ones_like(tied)
    for i in range(k):
        factor = (tied - i).clamp_min(0) / (tied + positives - i).clamp_min(1)
        miss = torch.where(slots > i, miss * factor, miss)
    return torch.where(ranks.positives > 0, 1.0 - miss, torch.zeros_like(miss))


def _count_above_and_equal(scores: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entries of each row of ``scores`` (c, G) strictly above / equal to ``threshold`` (c, 1): (c,) long each.

    In column slices, because ``sum`` of a bool tensor makes an int64 copy of it first.
    """
    above = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    equal = torch.zeros_like(above)
    for start in range(0, scores.shape[1], COUNT_BLOCK):
        block = scores[:, start : start + COUNT_BLOCK]
        above += (block > threshold).sum(dim=1)
        equal += (block == threshold).sum(dim=1)
    return above, equal


def _chunk_rows(chunk_size: int | None, gallery: torch.Tensor, memory_budget_mb: float) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive or None, got {chunk_size}")
        return chunk_size
    return rows_per_chunk(gallery.shape[0], gallery.element_size(), memory_budget_mb)


@torch.no_grad()
def iter_image_to_text_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> Iterator[QueryRanks]:
    """The ranks of :func:`image_to_text_ranks`, one chunk of images at a time (for timing and streaming)."""
    rows = _chunk_rows(chunk_size, text_emb, memory_budget_mb)
    num_images = image_emb.shape[0]
    # Captions grouped by image, once: the ground truth of chunk k is by_image[offsets[k]:offsets[k + 1]].
    sorted_ids, by_image = torch.sort(text_to_image, stable=True)  # M, M
    starts = list(range(0, num_images, rows))
    bounds = torch.tensor(starts + [num_images], device=sorted_ids.device, dtype=sorted_ids.dtype)
    offsets = torch.searchsorted(sorted_ids, bounds).tolist()  # chunks + 1, the one host sync
    text_t = text_emb.t()
    for k, start in enumerate(starts):
        stop = min(start + rows, num_images)
        scores = image_emb[start:stop] @ text_t  # c x M
        gt_cols = by_image[offsets[k] : offsets[k + 1]]  # captions of these images
        gt_rows = text_to_image[gt_cols] - start
        gt_scores = scores[gt_rows, gt_cols]
        best_gt = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=scores.device)
        best_gt.scatter_reduce_(0, gt_rows, gt_scores, reduce="amax")  # c
        at_best = torch.zeros(stop - start, dtype=torch.long, device=scores.device)
        at_best.scatter_add_(0, gt_rows, (gt_scores == best_gt[gt_rows]).long())  # ground truths tied at the top
        # No ground-truth caption beats the best one, so every caption above it is a negative.
        above, equal = _count_above_and_equal(scores, best_gt[:, None])
        del scores  # before the next block is allocated: one block at a time
        yield QueryRanks(above, equal - at_best, at_best)


@torch.no_grad()
def image_to_text_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> QueryRanks:
    """Where the best ground-truth caption of each image stands (an image is found when any caption is).

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (M, D) caption embeddings.
        text_to_image: (M,) long, the image index of each caption.
        chunk_size: images scored at once (peak memory about chunk_size x M x bytes per score);
            None derives it from ``memory_budget_mb``.
        memory_budget_mb: bound on one chunk's temporaries when ``chunk_size`` is None.
    Returns:
        :class:`QueryRanks` of N queries.
    """
    parts = list(iter_image_to_text_ranks(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb))
    return QueryRanks.cat(parts, image_emb.device)


@torch.no_grad()
def iter_text_to_image_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> Iterator[QueryRanks]:
    """The ranks of :func:`text_to_image_ranks`, one chunk of captions at a time."""
    rows = _chunk_rows(chunk_size, image_emb, memory_budget_mb)
    image_t = image_emb.t()
    for start in range(0, text_emb.shape[0], rows):
        scores = text_emb[start : start + rows] @ image_t  # c x N
        gt_score = scores.gather(1, text_to_image[start : start + rows, None])  # c x 1
        above, equal = _count_above_and_equal(scores, gt_score)
        found = torch.isfinite(gt_score[:, 0]).long()  # a NaN score is never found
        del scores
        yield QueryRanks(above, equal - found, found)


@torch.no_grad()
def text_to_image_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> QueryRanks:
    """Where the ground-truth image of each caption stands: :class:`QueryRanks` of M queries.

    Chunking as in :func:`image_to_text_ranks`.
    """
    parts = list(iter_text_to_image_ranks(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb))
    return QueryRanks.cat(parts, text_emb.device)


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
) -> dict[str, float]:
    """The full table (keys ``METRIC_KEYS``) for one gallery; chunking as in :func:`image_to_text_ranks`."""
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb)
    return recall_table(i2t, t2i)


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
