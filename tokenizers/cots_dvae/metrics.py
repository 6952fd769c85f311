"""Evaluation of a dVAE: hard-token reconstruction error and codebook usage."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from dall_e import map_pixels, unmap_pixels
from torch import nn


def decode_pixels(decoder: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """Decoder output as an image.

    The ``dall_e.Decoder`` emits 2*C channels (logit-Laplace mu and log-scale);
    we use sigmoid(first C) as the mean in ``map_pixels`` space, then undo the map.

    Args:
        decoder: ``dall_e.Decoder``.
        codes: float (B, vocab, h, w) one-hot or relaxed codes.

    Returns:
        float (B, C, 8h, 8w) in [0, 1].
    """
    return unmap_pixels(torch.sigmoid(decode_mean_logits(decoder, codes)))


def decode_mean_logits(decoder: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """The first C of the decoder's 2*C output channels, (B, C, 8h, 8w)."""
    out = decoder(codes)
    return out[:, : out.shape[1] // 2]


def codebook_usage(tokens: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """Perplexity of the token histogram and the fraction of codes used.

    Args:
        tokens: int64 ids of any shape.
        vocab_size: codebook size.

    Returns:
        ``perplexity`` (exp of the histogram entropy; vocab_size if uniform),
        ``codes_used`` (fraction with count > 0) and ``n_codes_used``.
    """
    counts = torch.bincount(tokens.flatten().cpu(), minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"perplexity": math.exp(entropy), "codes_used": used / vocab_size, "n_codes_used": used}


@torch.no_grad()
def evaluate_dvae(
    encoder: nn.Module, decoder: nn.Module, images: torch.Tensor, vocab_size: int, batch_size: int = 64
) -> dict[str, float]:
    """Reconstruct ``images`` through argmax tokens; report MSE and codebook usage.

    Args:
        encoder, decoder: ``dall_e`` modules (put in eval mode by the caller if needed).
        images: uint8 (N, 3, S, S).
        vocab_size: codebook size.
        batch_size: evaluation batch.

    Returns:
        ``recon_mse`` (mean squared error in [0, 1] pixel space) plus ``codebook_usage``.
    """
    device = next(encoder.parameters()).device
    sq_err, n, all_tokens = 0.0, 0, []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(device).float() / 255
        tokens = encoder(map_pixels(x)).argmax(dim=1)
        one_hot = F.one_hot(tokens, vocab_size).permute(0, 3, 1, 2).float()
        recon = decode_pixels(decoder, one_hot)
        sq_err += F.mse_loss(recon, x, reduction="sum").item()
        n += x.numel()
        all_tokens.append(tokens.cpu())
    return {"recon_mse": sq_err / n, **codebook_usage(torch.cat(all_tokens), vocab_size)}


@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, images: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Hard-token reconstructions of uint8 (B, 3, S, S) images, float (B, 3, S, S) in [0, 1]."""
    device = next(encoder.parameters()).device
    x = images.to(device).float() / 255
    tokens = encoder(map_pixels(x)).argmax(dim=1)
    return decode_pixels(decoder, F.one_hot(tokens, vocab_size).permute(0, 3, 1, 2).float()).cpu()
