"""Image-text retrieval metrics (DESIGN §8) with chunked scoring.

Scores are dot products of separately computed embeddings. Only a
(chunk x gallery) block of scores exists at any time, so memory stays bounded
at any test-set size; ranks are exact (count of strictly better candidates).
By default the chunk size follows from a memory budget for the block and its
temporaries (see :func:`rows_per_chunk`).
"""
from __future__ import annotations

from collections.abc import Iterator

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


def _count_greater(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Entries of each row of ``scores`` (c, G) strictly above ``threshold`` (c, 1): (c,) long.

    In column slices, because ``sum`` of a bool tensor makes an int64 copy of it first.
    """
    counts = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    for start in range(0, scores.shape[1], COUNT_BLOCK):
        counts += (scores[:, start : start + COUNT_BLOCK] > threshold).sum(dim=1)
    return counts


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
) -> Iterator[torch.Tensor]:
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
        best_gt = torch.full((stop - start,), float("-inf"), dtype=scores.dtype, device=scores.device)
        best_gt.scatter_reduce_(0, gt_rows, scores[gt_rows, gt_cols], reduce="amax")  # c
        # No ground-truth caption beats the best one, so counting every caption above it is exact.
        ranks = _count_greater(scores, best_gt[:, None])
        del scores  # before the next block is allocated: one block at a time
        yield ranks


@torch.no_grad()
def image_to_text_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:
    """0-based rank of the best ground-truth caption for each image.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (M, D) caption embeddings.
        text_to_image: (M,) long, the image index of each caption.
        chunk_size: images scored at once (peak memory about chunk_size x M x bytes per score);
            None derives it from ``memory_budget_mb``.
        memory_budget_mb: bound on one chunk's temporaries when ``chunk_size`` is None.
    Returns:
        (N,) long ranks.
    """
    ranks = list(iter_image_to_text_ranks(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=image_emb.device)


@torch.no_grad()
def iter_text_to_image_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> Iterator[torch.Tensor]:
    """The ranks of :func:`text_to_image_ranks`, one chunk of captions at a time."""
    rows = _chunk_rows(chunk_size, image_emb, memory_budget_mb)
    image_t = image_emb.t()
    for start in range(0, text_emb.shape[0], rows):
        scores = text_emb[start : start + rows] @ image_t  # c x N
        gt_score = scores.gather(1, text_to_image[start : start + rows, None])  # c x 1
        ranks = _count_greater(scores, gt_score)
        del scores
        yield ranks


@torch.no_grad()
def text_to_image_ranks(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    chunk_size: int | None = None,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
) -> torch.Tensor:
    """0-based rank of the ground-truth image for each caption: (M,) long. Chunking as in :func:`image_to_text_ranks`."""
    ranks = list(iter_text_to_image_ranks(image_emb, text_emb, text_to_image, chunk_size, memory_budget_mb))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long, device=text_emb.device)


def recall_table(i2t_ranks: torch.Tensor, t2i_ranks: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """R@K in percent both ways, their mean and their sum (rsum)."""
    out: dict[str, float] = {}
    for name, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        for k in ks:
            out[f"{name}_r{k}"] = 100.0 * (ranks < k).float().mean().item()
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
        f"| {name} | " + " | ".join(f"{row.get(k, float('nan')):.2f}" for k in METRIC_KEYS) + " |" for name, row in rows.items()
    ]
    return "\n".join(lines)
