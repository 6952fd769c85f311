"""Crop boxes and the two views of one crop: the ViT's and the dVAE's (METHOD §4: same crop, lower resolution).

A box is ``(top, left, height, width)`` in source pixels. Boxes are drawn with a
numpy Generator (torchvision's RandomResizedCrop algorithm, reimplemented so that
recorded boxes do not depend on the torchvision version), then both views are
cut from the same decoded image, like BEiT's two-resolution crop.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from cots.data.images import IMAGENET_MEAN, IMAGENET_STD

Box = tuple[int, int, int, int]  # top, left, height, width
DEFAULT_RATIO = (3 / 4, 4 / 3)


def center_box(height: int, width: int) -> Box:
    """The central square of side min(height, width) (what resize-short-side + centre-crop keeps)."""
    side = min(height, width)
    return int(round((height - side) / 2)), int(round((width - side) / 2)), side, side


def random_resized_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    attempts: int = 10,
) -> Box:
    """A RandomResizedCrop box: area fraction in ``scale``, aspect (w/h) log-uniform in ``ratio``.

    Falls back to the largest centred box with an aspect in ``ratio`` (as torchvision does).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def image_to_uint8(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 tensor of an RGB PIL image."""
    return TF.pil_to_tensor(image)


def crop_view(image: torch.Tensor, box: Box, size: int, flip: bool = False) -> torch.Tensor:
    """Cut ``box`` from a (3, H, W) uint8 image and resize it to size x size (bilinear, antialiased).

    Returns:
        float32 (3, size, size) in [0, 1].
    """
    top, left, h, w = box
    if top < 0 or left < 0 or h <= 0 or w <= 0 or top + h > image.shape[-2] or left + w > image.shape[-1]:
        raise ValueError(f"crop box {box} lies outside the image of size {tuple(image.shape[-2:])}")
    view = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    if flip:
        view = TF.horizontal_flip(view)
    return view.float().div_(255)


def normalize_imagenet(view: torch.Tensor) -> torch.Tensor:
    """ImageNet normalisation of a [0, 1] view (what the ViT expects)."""
    return TF.normalize(view, list(IMAGENET_MEAN), list(IMAGENET_STD))
