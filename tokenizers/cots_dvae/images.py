"""Read images into one in-memory uint8 tensor for dVAE training.

Takes image paths, not manifests: ``cots_dvae`` imports nothing from ``cots``; ``cots-dvae train``
(:mod:`cots.prepare.dvae_cli`) reads the manifest and passes its image paths.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of ``image``; transparent pixels become white.

    ``convert("RGB")`` alone keeps whatever colour hides under alpha = 0 (often
    black), which differs between files; compositing on white is what a viewer
    shows and gives emoji-style images a consistent background.
    """
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_square(path: str | Path, size: int) -> torch.Tensor:
    """Open an image, resize its shorter side to ``size`` and centre-crop.

    Args:
        path: image file.
        size: output side in pixels.

    Returns:
        uint8 (3, size, size).
    """
    with Image.open(path) as raw:
        image = to_rgb(raw)
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    image = image.crop((left, top, left + size, top + size))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def load_images(paths: Sequence[str | Path], size: int, source: str | Path = "images") -> torch.Tensor:
    """The images at ``paths``, in order, resized and cropped (:func:`load_square`).

    Unreadable files are skipped with a count on stderr; none readable is an error.

    Args:
        paths: image files.
        size: output side in pixels.
        source: where the paths came from (e.g. the manifest), named in the error.

    Returns:
        uint8 (N, 3, size, size), N = the readable paths.
    """
    images, failed = [], []
    for path in paths:
        try:
            images.append(load_square(path, size))
        except (OSError, ValueError) as err:  # PIL raises OSError for missing/corrupt files
            failed.append(f"{path}: {err}")
    if failed:
        print(f"skipped {len(failed)} unreadable image(s), e.g. {failed[0]}", file=sys.stderr)
    if not images:
        raise ValueError(f"{source}: no readable images among {len(paths)} entries")
    return torch.stack(images)
