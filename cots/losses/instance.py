"""Instance level: cross-modal momentum contrast over queues (METHOD §3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Logit given to empty queue slots: exp() of it is exactly 0 in float32, and unlike
# -inf it keeps 0 * log(p) terms finite in KL losses.
EMPTY_SLOT_LOGIT = -1e4


def masked_key_logits(
    queries: torch.Tensor, keys: torch.Tensor, temperature: torch.Tensor, key_mask: torch.Tensor | None
) -> torch.Tensor:
    """Similarity logits of queries against keys, empty slots pushed to ``EMPTY_SLOT_LOGIT``.

    Args:
        queries: (B, D) L2-normalised.
        keys: (N, D) L2-normalised.
        temperature: scalar tensor tau.
        key_mask: (N,) bool, False where the key slot is empty; None = all valid.
    Returns:
        (B, N) float32 logits ``queries @ keys.T / tau``.
    """
    logits = queries.float() @ keys.float().t() / temperature.float()  # B x N
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[None, :], EMPTY_SLOT_LOGIT)
    return logits


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None, weight_sum: torch.Tensor | None) -> torch.Tensor:
    """sum(w * v) / sum(w); ``weight_sum`` overrides the denominator (e.g. the global sum over ranks)."""
    if weights is None:
        return values.mean() if weight_sum is None else values.sum() / weight_sum
    denom = weights.sum() if weight_sum is None else weight_sum
    return (weights * values).sum() / denom.clamp_min(1e-6)


def positive_targets(
    positive_index: torch.Tensor,
    num_keys: int,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target distribution over the keys: uniform over each query's positives.

    The positives of query i are its own key and, with groups, every valid key of the same group
    (ALBEF's retrieval fine-tuning idea: another caption of the same image, or the same caption on
    another rendering, is not a negative). Negative groups match nothing.

    Args:
        positive_index: (B,) column of each query's own key.
        query_groups: (B,) long; key_groups: (N,) long; None = one positive per query.
        key_mask: (N,) bool, False for empty slots (never positives).
    Returns:
        (B, N) float32, rows summing to 1.
    """
    own = F.one_hot(positive_index, num_keys).bool()  # B x N
    if query_groups is None or key_groups is None:
        return own.float()
    same = (key_groups[None, :] == query_groups[:, None]) & (query_groups[:, None] >= 0)  # B x N
    if key_mask is not None:
        same = same & key_mask[None, :]
    positives = (same | own).float()
    return positives / positives.sum(dim=1, keepdim=True)


def instance_contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_keys: torch.Tensor,
    text_keys: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: torch.Tensor,
    weights: torch.Tensor | None = None,
    key_mask: torch.Tensor | None = None,
    weight_sum: torch.Tensor | None = None,
    query_groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """L_inst = (L_i2t + L_t2i) / 2 with per-pair weights.

    L_i2t = - sum_i w_i log softmax_j(z^v_i . k^t_j / tau)[pos_i] / sum_i w_i, and t2i alike.
    With pair groups, the log-probability of the positive becomes the mean over the target
    distribution of :func:`positive_targets` (the same value when every group is unique).

    Args:
        image_feat, text_feat: (B, D) online features z^v, z^t (normalised, with gradient).
        image_keys, text_keys: (N, D) momentum keys: the gathered batch then the queue.
        positive_index: (B,) long, column of each pair's own momentum key in the keys.
        temperature: scalar tau.
        weights: (B,) in {0, 1} (AMF), None = all ones.
        key_mask: (N,) bool, False for empty queue slots.
        weight_sum: denominator override (sum of weights over all ranks / world size).
        query_groups: (B,) long pair groups of the queries; key_groups: (N,) of the keys; None = off.
    Returns:
        dict with ``loss`` (scalar), ``i2t`` and ``t2i`` (scalars), ``positives`` (mean number of
        positives per query, 1 without groups).
    """
    logits_i2t = masked_key_logits(image_feat, text_keys, temperature, key_mask)  # B x N
    logits_t2i = masked_key_logits(text_feat, image_keys, temperature, key_mask)  # B x N
    if query_groups is None or key_groups is None:
        nll_i2t = F.cross_entropy(logits_i2t, positive_index, reduction="none")  # B
        nll_t2i = F.cross_entropy(logits_t2i, positive_index, reduction="none")  # B
        positives = torch.ones((), device=logits_i2t.device)
    else:
        targets = positive_targets(positive_index, logits_i2t.shape[1], query_groups, key_groups, key_mask)  # B x N
        nll_i2t = -(targets * logits_i2t.log_softmax(dim=1)).sum(dim=1)  # B
        nll_t2i = -(targets * logits_t2i.log_softmax(dim=1)).sum(dim=1)  # B
        positives = (targets > 0).sum(dim=1).float().mean()
    i2t = weighted_mean(nll_i2t, weights, weight_sum)
    t2i = weighted_mean(nll_t2i, weights, weight_sum)
    return {"loss": (i2t + t2i) / 2, "i2t": i2t, "t2i": t2i, "positives": positives}
