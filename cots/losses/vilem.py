"""ViLEM error modeling loss (METHOD §7): L_vilem = BCE(detection) + CE(correction at replaced positions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cots.losses.mvlm import cmlm_loss
from cots.masking import IGNORE_INDEX


def vilem_loss(
    detection_logits: torch.Tensor,
    detection_labels: torch.Tensor,
    correction_logits: torch.Tensor,
    correction_labels: torch.Tensor,
    detection_denominator: torch.Tensor | float | None = None,
    correction_denominator: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """Mean BCE over scored tokens plus mean CE over replaced tokens.

    Args:
        detection_logits: (B, L) one logit per token (replaced vs kept).
        detection_labels: (B, L) long, 1 replaced / 0 kept / IGNORE_INDEX not scored (special, padding).
        correction_logits: (M, V) at the replaced positions in row-major order, or (B, L, V).
        correction_labels: (B, L) long, the original id at replaced positions, IGNORE_INDEX elsewhere.
        detection_denominator, correction_denominator: override the local counts (the global mean
            count over ranks, so that DDP's gradient mean equals the one-process loss).
    Returns:
        dict with ``loss``, ``detection``, ``correction`` and the accuracies
        ``detection_accuracy`` (over scored tokens), ``correction_accuracy`` (over replaced tokens).
    """
    scored = detection_labels != IGNORE_INDEX  # B x L
    logits = detection_logits[scored].float()  # N
    targets = detection_labels[scored].float()  # N
    denom = detection_denominator if detection_denominator is not None else max(targets.numel(), 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.clamp_min(1)
    detection = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / denom
    correction = cmlm_loss(correction_logits, correction_labels, correction_denominator)
    with torch.no_grad():
        detection_accuracy = ((logits > 0).float() == targets).float().sum() / max(targets.numel(), 1)
    return {
        "loss": detection + correction["loss"],
        "detection": detection,
        "correction": correction["loss"],
        "detection_accuracy": detection_accuracy,
        "correction_accuracy": correction["accuracy"],
    }
