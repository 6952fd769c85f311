"""Adaptive Momentum Filter (METHOD §6): drop noisy positive pairs by their momentum similarity.

A queue ``Q^s`` keeps the momentum similarities ``s_i = zhat^v_i . zhat^t_i`` of past positive
pairs. Once it is full, a Gaussian is fitted to it and pair i stays a positive only if
``s_i >= mu - k * sigma``. Everything here runs on the device without host syncs: the
"is the queue full yet" branch is a ``torch.where``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cots.queues import RingQueue


@dataclass
class AMFDecision:
    """One step's filter decision over the global batch of G pairs (B local)."""

    similarities: torch.Tensor  # G, s_i of the global batch (to enqueue after the step)
    keep: torch.Tensor  # G bool, False = filtered as noisy
    weights: torch.Tensor  # B float in {0, 1}, the local pairs' positive weights
    active: torch.Tensor  # 0-dim bool, the queue was full (the filter could drop pairs)
    mean: torch.Tensor  # 0-dim, mu of the queue (of its filled part while filling)
    std: torch.Tensor  # 0-dim, sigma
    threshold: torch.Tensor  # 0-dim, mu - k sigma

    def filtered_fraction(self) -> torch.Tensor:
        return 1.0 - self.keep.float().mean()


def positive_similarities(image_keys: torch.Tensor, text_keys: torch.Tensor) -> torch.Tensor:
    """s_i = zhat^v_i . zhat^t_i: (G, D), (G, D) -> (G,) float32."""
    return (image_keys.float() * text_keys.float()).sum(-1)


def gaussian_fit(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (population) standard deviation of ``values`` (K,) over the ``valid`` (K,) entries."""
    w = valid.float()
    n = w.sum().clamp_min(1.0)
    mean = (w * values).sum() / n
    std = ((w * (values - mean) ** 2).sum() / n).sqrt()
    return mean, std


def amf_filter(
    similarities: torch.Tensor, queue: torch.Tensor, queue_valid: torch.Tensor, queue_full: torch.Tensor, k: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which positives to keep: ``s_i >= mu - k sigma`` once the queue is full, every pair before.

    Args:
        similarities: (G,) s_i of this step's pairs.
        queue: (K,) past similarities Q^s; queue_valid (K,) bool marks filled slots.
        queue_full: 0-dim bool.
        k: width of the band below the mean that is still trusted.
    Returns:
        keep (G,) bool, mu, sigma, threshold (0-dim each).
    """
    mean, std = gaussian_fit(queue.float(), queue_valid)
    threshold = mean - k * std
    keep = torch.where(queue_full, similarities >= threshold, torch.ones_like(similarities, dtype=torch.bool))
    return keep, mean, std, threshold


def noise_confusion(keep: torch.Tensor, is_noisy: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Counts [filtered & noisy, filtered & clean, kept & noisy, kept & clean] of one step: (4,), zeros while
    inactive."""
    filtered, noisy = ~keep, is_noisy.bool()
    counts = torch.stack(
        [(filtered & noisy).sum(), (filtered & ~noisy).sum(), (keep & noisy).sum(), (keep & ~noisy).sum()]
    )
    return counts.float() * active.float()


def precision_recall(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Of the filtered pairs, the noisy share; of the noisy pairs, the filtered share. NaN when undefined."""
    tp, fp, fn = counts[0], counts[1], counts[2]
    nan = torch.full_like(tp, float("nan"))
    precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1.0), nan)
    recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1.0), nan)
    return precision, recall


class AdaptiveMomentumFilter(nn.Module):
    """The similarity queue Q^s (a buffer, so it lives in checkpoints) and the filter over it.

    Args:
        queue_size: K_s, past positive-pair similarities kept; the filter is off until it is full
            (so it is also the warm-up, in pairs).
        k: a pair is kept while ``s_i >= mu - k sigma``.
    """

    def __init__(self, queue_size: int = 4096, k: float = 1.0) -> None:
        super().__init__()
        if queue_size < 2:
            raise ValueError(f"objective.amf.queue_size must be at least 2 to fit a Gaussian, got {queue_size}")
        self.k = float(k)
        self.similarity_queue = RingQueue(queue_size)

    def forward(self, image_keys: torch.Tensor, text_keys: torch.Tensor, positive_index: torch.Tensor) -> AMFDecision:
        """Decide over the gathered momentum keys (G, D) each; ``positive_index`` (B,) picks the local pairs."""
        s = positive_similarities(image_keys, text_keys)  # G
        queue = self.similarity_queue
        keep, mean, std, threshold = amf_filter(s, queue.data, queue.valid_mask(), queue.is_full(), self.k)
        weights = keep[positive_index].float()  # B
        return AMFDecision(s, keep, weights, queue.is_full(), mean, std, threshold)

    @torch.no_grad()
    def enqueue(self, similarities: torch.Tensor) -> None:
        """Push this step's s (G,) after its decision: filtered pairs enter Q^s too."""
        self.similarity_queue.enqueue(similarities)
