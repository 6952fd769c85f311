"""Image-text retrieval metrics (DESIGN §8) with chunked scoring.

Scores are dot products of separately computed embeddings. Only a
(chunk x gallery) block of scores exists at any time, so memory stays bounded
at any test-set size; ranks are exact (count of strictly better candidates).
"""
from __future__ import annotations

import torch

METRIC_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "rsum")


@torch.no_grad()
def image_to_text_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """0-based rank of the best ground-truth caption for each image.

    Args:
        image_emb: (N, D) image embeddings.
        text_emb: (M, D) caption embeddings.
        text_to_image: (M,) long, the image index of each caption.
        chunk_size: images scored at once; peak memory is chunk_size x M scores.
    Returns:
        (N,) long ranks.
    """
    ranks = []
    text_t = text_emb.t()
    for start in range(0, image_emb.shape[0], chunk_size):
        stop = min(start + chunk_size, image_emb.shape[0])
        scores = image_emb[start:stop] @ text_t  # c x M
        image_ids = torch.arange(start, stop, device=scores.device)
        is_gt = text_to_image[None, :] == image_ids[:, None]  # c x M
        best_gt = scores.masked_fill(~is_gt, float("-inf")).amax(dim=1, keepdim=True)  # c x 1
        ranks.append(((scores > best_gt) & ~is_gt).sum(dim=1))
    return torch.cat(ranks)


@torch.no_grad()
def text_to_image_ranks(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """0-based rank of the ground-truth image for each caption: (M,) long."""
    ranks = []
    image_t = image_emb.t()
    for start in range(0, text_emb.shape[0], chunk_size):
        scores = text_emb[start : start + chunk_size] @ image_t  # c x N
        gt = text_to_image[start : start + chunk_size]
        gt_score = scores.gather(1, gt[:, None])  # c x 1
        ranks.append((scores > gt_score).sum(dim=1))
    return torch.cat(ranks)


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
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor, chunk_size: int = 1024
) -> dict[str, float]:
    """The full table (keys ``METRIC_KEYS``) for one gallery."""
    i2t = image_to_text_ranks(image_emb, text_emb, text_to_image, chunk_size)
    t2i = text_to_image_ranks(image_emb, text_emb, text_to_image, chunk_size)
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
