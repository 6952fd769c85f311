"""The "COCO 1K" protocol (METHOD §8): the 5K test scored as five 1K galleries, the table averaged over them.

Papers report COCO twice: on the whole 5K test gallery, and as the mean over five consecutive folds of 1,000
images in Karpathy order, each fold a gallery of its own images and their captions. The folds reuse the
embeddings of the full gallery; each is scored by :func:`cots.metrics.retrieval.retrieval_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cots.metrics.retrieval import METRIC_KEYS, retrieval_metrics


@dataclass
class FoldTables:
    """``mean``: each metric averaged over the folds (the number papers print); ``folds``: one table per fold."""

    fold_size: int
    mean: dict[str, float]
    folds: list[dict[str, float]]

    def to_json(self) -> dict:
        return {"fold_size": self.fold_size, "mean": self.mean, "per_fold": self.folds}


def fold_table_prefix(stage: str, fold_size: int) -> str:
    """Where fold tables are logged: ``test_1k`` for folds of 1,000 images, ``test_fold<n>`` otherwise."""
    return f"{stage}_{fold_size // 1000}k" if fold_size % 1000 == 0 else f"{stage}_fold{fold_size}"


def fold_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    fold_size: int,
    chunk_size: int | None = None,
) -> FoldTables:
    """The retrieval table of each fold of ``fold_size`` consecutive images, and their mean.

    Args:
        image_emb: (N, D) gallery images in gallery order; N must be a multiple of ``fold_size``.
        text_emb: (M, D) captions, any order.
        text_to_image: (M,) long, the image of each caption: a caption belongs to its image's fold.
        fold_size: images per fold (1000 for COCO 1K).
        chunk_size: passed to :func:`retrieval_metrics`.
    """
    num_images = image_emb.shape[0]
    if fold_size < 1 or num_images % fold_size:
        raise ValueError(f"{num_images} images do not split into folds of {fold_size}")
    tables = []
    for start in range(0, num_images, fold_size):
        captions = (text_to_image >= start) & (text_to_image < start + fold_size)  # M bool
        tables.append(
            retrieval_metrics(
                image_emb[start : start + fold_size], text_emb[captions], text_to_image[captions] - start, chunk_size
            )
        )
    mean = {key: sum(table[key] for table in tables) / len(tables) for key in METRIC_KEYS}
    return FoldTables(fold_size, mean, tables)
