"""A PNG sheet of originals beside their reconstructions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def save_comparison(
    path: str | Path, originals: torch.Tensor, recons: torch.Tensor, per_row: int = 4, scale: int = 2
) -> Path:
    """Write pairs (original | reconstruction), ``per_row`` pairs per row.

    Args:
        path: destination ``.png``.
        originals: uint8 (B, 3, S, S) or float in [0, 1].
        recons: same shape as ``originals``.
        per_row: pairs per row.
        scale: nearest-neighbour upscaling so small images stay visible.
    """
    a, b = _to_uint8(originals), _to_uint8(recons)
    if a.shape != b.shape:
        raise ValueError(f"originals {tuple(a.shape)} and reconstructions {tuple(b.shape)} differ in shape")
    n, _, s, _ = a.shape
    pad = 2
    rows = (n + per_row - 1) // per_row
    sheet = np.full((rows * (s + pad) + pad, per_row * (2 * s + 3 * pad) + pad, 3), 128, np.uint8)
    for i in range(n):
        r, c = divmod(i, per_row)
        y, x = pad + r * (s + pad), pad + c * (2 * s + 3 * pad)
        sheet[y : y + s, x : x + s] = a[i].permute(1, 2, 0).numpy()
        sheet[y : y + s, x + s + pad : x + 2 * s + pad] = b[i].permute(1, 2, 0).numpy()
    image = Image.fromarray(sheet)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dtype == torch.uint8:
        return images.cpu()
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
