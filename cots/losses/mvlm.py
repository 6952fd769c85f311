"""Token level: cross-modal masked vision / language modeling losses (METHOD §4).

Cross-entropy on masked positions only, averaged over them. The heads
(``cots.models.mvlm_heads``) usually score only the masked positions, giving
(M, V) logits; full (B, T, V) logits are accepted too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cots.masking import IGNORE_INDEX


def masked_token_loss(
    logits: torch.Tensor, targets: torch.Tensor, denominator: torch.Tensor | float | None = None
) -> dict[str, torch.Tensor]:
    """Mean cross-entropy over predicted positions.

    Args:
        logits: (M, V) scores of the M predicted positions.
        targets: (M,) long class ids.
        denominator: overrides M (e.g. the global count over ranks / world size, so that DDP's
            gradient mean equals the one-process loss).
    Returns:
        dict with ``loss`` (scalar; 0 with a gradient path when M = 0) and ``accuracy`` (no grad).
    """
    nll = F.cross_entropy(logits.float(), targets.long(), reduction="sum")  # sum over M
    count = targets.numel()
    denom = denominator if denominator is not None else max(count, 1)
    if isinstance(denom, torch.Tensor):
        denom = denom.clamp_min(1)
    with torch.no_grad():
        correct = (logits.argmax(dim=-1) == targets).sum().float()
        accuracy = correct / max(count, 1)
    return {"loss": nll / denom, "accuracy": accuracy}


def cmvm_loss(
    logits: torch.Tensor,
    image_tokens: torch.Tensor,
    patch_mask: torch.Tensor,
    denominator: torch.Tensor | float | None = None,
) -> dict[str, torch.Tensor]:
    """L_cmvm = mean_{j in M} CE(head_v(fuse(H^v_j, h^t)), token_j).

    Args:
        logits: (M, V_img) for the masked patches in row-major batch order
            (``CMVMHead(..., patch_mask)``), or (B, P, V_img) for all patches.
        image_tokens: (B, h, w) or (B, P) long dVAE ids of the unmasked image (P = h*w).
        patch_mask: (B, P) bool, True = masked (predicted).
        denominator: see :func:`masked_token_loss`.
    Returns:
        dict with ``loss`` and ``accuracy`` over masked patches.
    """
    targets = image_tokens.reshape(patch_mask.shape)[patch_mask]  # M
    if logits.ndim == 3:
        logits = logits[patch_mask]  # M x V_img
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"cmvm_loss: {logits.shape[0]} logit rows for {targets.shape[0]} masked patches")
    return masked_token_loss(logits, targets, denominator)


def cmlm_loss(
    logits: torch.Tensor, labels: torch.Tensor, denominator: torch.Tensor | float | None = None
) -> dict[str, torch.Tensor]:
    """L_cmlm = mean_{j masked} CE(head_t(fuse(H^t_j, h^v)), word_j).

    Args:
        logits: (M, V_txt) for the masked tokens in row-major batch order
            (``CMLMHead(..., labels != -100)``), or (B, L, V_txt) for all tokens.
        labels: (B, L) long, original id at masked positions, -100 elsewhere
            (from :func:`cots.masking.mask_text_tokens`).
        denominator: see :func:`masked_token_loss`.
    Returns:
        dict with ``loss`` and ``accuracy`` over masked tokens.
    """
    predicted = labels != IGNORE_INDEX  # B x L
    targets = labels[predicted]  # M
    if logits.ndim == 3:
        logits = logits[predicted]  # M x V_txt
    if logits.shape[0] != targets.shape[0]:
        raise ValueError(f"cmlm_loss: {logits.shape[0]} logit rows for {targets.shape[0]} masked tokens")
    return masked_token_loss(logits, targets, denominator)
