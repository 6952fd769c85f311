"""Task level: KL between the image-to-text and text-to-image retrieval distributions (METHOD §5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cots.losses.instance import masked_key_logits, weighted_mean

# KL(p_i2t || p_t2i) as written in METHOD §5, the reverse, or the mean of both.
TASK_DIRECTIONS = ("i2t||t2i", "t2i||i2t", "symmetric")


def retrieval_log_probs(
    queries: torch.Tensor,
    own_keys: torch.Tensor,
    queue: torch.Tensor,
    temperature: torch.Tensor,
    queue_mask: torch.Tensor | None,
) -> torch.Tensor:
    """log softmax over [own momentum key ; queue] for each query.

    Args:
        queries: (B, D) online features, L2-normalised.
        own_keys: (B, D) each query's paired momentum key of the other modality.
        queue: (K, D) momentum features of the other modality.
        temperature: scalar tau.
        queue_mask: (K,) bool, False for empty queue slots; None = all valid.
    Returns:
        (B, 1+K) float32 log-probabilities; empty slots get ~``EMPTY_SLOT_LOGIT`` (probability exactly 0).
    """
    own = (queries.float() * own_keys.float()).sum(-1, keepdim=True) / temperature.float()  # B x 1
    others = masked_key_logits(queries, queue, temperature, queue_mask)  # B x K
    return F.log_softmax(torch.cat([own, others], dim=1), dim=1)  # B x (1+K)


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (B, N) -> (B,); 0 * log 0 terms are exactly 0."""
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)


def task_kl_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_momentum: torch.Tensor,
    text_momentum: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temperature: torch.Tensor,
    queue_mask: torch.Tensor | None = None,
    direction: str = "i2t||t2i",
    weights: torch.Tensor | None = None,
    weight_sum: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """L_task = weighted mean_i KL(p^{i2t}_i || p^{t2i}_i) (or reversed, or symmetric).

    p^{i2t}_i = softmax([z^v_i . zhat^t_i, z^v_i . Q^t_1..K] / tau), p^{t2i}_i likewise with z^t against
    [zhat^v_i ; Q^v]. Column j >= 1 of both is queue row j, i.e. the same past pair, so the two
    distributions live on one candidate set. Both depend on online features: gradients reach both towers.

    Args:
        image_feat, text_feat: (B, D) online z^v, z^t (with gradient).
        image_momentum, text_momentum: (B, D) the pairs' own momentum keys zhat^v, zhat^t.
        image_queue, text_queue: (K, D) Q^v, Q^t.
        temperature: scalar tau_task.
        queue_mask: (K,) bool, False for empty slots.
        direction: one of ``TASK_DIRECTIONS``.
        weights: (B,) AMF weights (filtered pairs 0), None = all ones.
        weight_sum: denominator override (global weight sum / world size), as in L_inst.
    Returns:
        dict with ``loss`` (scalar) and ``kl`` (B,) per-pair divergences (detached).
    """
    if direction not in TASK_DIRECTIONS:
        raise ValueError(f"objective.task.direction must be one of {TASK_DIRECTIONS}, got {direction!r}")
    log_i2t = retrieval_log_probs(image_feat, text_momentum, text_queue, temperature, queue_mask)  # B x (1+K)
    log_t2i = retrieval_log_probs(text_feat, image_momentum, image_queue, temperature, queue_mask)  # B x (1+K)
    if direction == "i2t||t2i":
        kl = kl_rows(log_i2t, log_t2i)
    elif direction == "t2i||i2t":
        kl = kl_rows(log_t2i, log_i2t)
    else:
        kl = (kl_rows(log_i2t, log_t2i) + kl_rows(log_t2i, log_i2t)) / 2  # B
    return {"loss": weighted_mean(kl, weights, weight_sum), "kl": kl.detach()}
