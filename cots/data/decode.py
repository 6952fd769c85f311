"""Image bytes -> RGB for the training crop, with the fast JPEG decoders the field uses.

``pillow`` (default) is :func:`cots.data.images.load_rgb`, what the manifest path uses.
``simplejpeg`` (libjpeg-turbo straight to a NumPy array) and ``torchvision`` (``decode_jpeg``)
decode JPEG bytes to a (3, H, W) uint8 tensor without a PIL image in between; anything they refuse
(another format, CMYK, a truncated file) goes to Pillow, which decodes it or names the reason it
cannot. ``reduce`` decodes a JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling) when
even the smallest crop the random resized crop can draw is still at least the output size there,
so crops are only ever downsampled; it changes pixels slightly (a different downsampling), so it
is off by default. ``bench/loader.py`` measures each against plain Pillow.
"""

from __future__ import annotations

import io
import math

import torch
from PIL import Image

from cots.data.images import MAX_IMAGE_PIXELS, load_rgb

DECODERS = ("pillow", "simplejpeg", "torchvision")
JPEG_MAGIC = b"\xff\xd8"


def reduced_size(width: int, height: int, image_size: int, min_scale: float) -> tuple[int, int] | None:
    """(width, height) to decode a JPEG at, or None for full size.

    The random resized crop keeps at least ``min_scale`` of the area at an aspect ratio within [3/4, 4/3],
    so its shorter side is at least sqrt(min_scale * W * H * 3/4); decoding at 1/f keeps that >= image_size.
    """
    smallest_crop_side = math.sqrt(min_scale * width * height * 0.75)
    factor = 8
    while factor > 1 and smallest_crop_side / factor < image_size:
        factor //= 2
    return None if factor == 1 else (-(-width // factor), -(-height // factor))


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's header, None if not a JPEG Pillow can read the header of."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size if img.format == "JPEG" else None
    except Exception:
        return None


class Decoder:
    """Callable ``bytes -> PIL RGB image or (3, H, W) uint8 tensor`` (both go into the training transform).

    Args:
        name: one of :data:`DECODERS`.
        reduce_for: (image_size, min_scale) of the random resized crop to decode JPEGs reduced for, or None.
    """

    def __init__(self, name: str = "pillow", reduce_for: tuple[int, float] | None = None) -> None:
        if name not in DECODERS:
            raise ValueError(f"data.decoder must be one of {DECODERS}, got {name!r}")
        if name == "simplejpeg":
            import simplejpeg  # noqa: F401 (fail at start-up, not in a worker)
        self.name, self.reduce_for = name, reduce_for

    def __call__(self, data: bytes):
        if self.name != "pillow" and data[:2] == JPEG_MAGIC:
            try:
                return self._fast(data)
            except Exception:  # Pillow decides: it decodes what it can and names the reason otherwise
                pass
        draft = None
        if self.reduce_for is not None and data[:2] == JPEG_MAGIC:
            size = jpeg_size(data)
            draft = size and reduced_size(*size, *self.reduce_for)
        return load_rgb(io.BytesIO(data), draft=draft)

    def _fast(self, data: bytes) -> torch.Tensor:
        if self.name == "simplejpeg":
            import simplejpeg

            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            if width * height > MAX_IMAGE_PIXELS:
                raise ValueError("too large: Pillow names it")
            kwargs = {}
            if self.reduce_for is not None:
                reduced = reduced_size(width, height, *self.reduce_for)
                if reduced:
                    kwargs = {"min_width": reduced[0], "min_height": reduced[1]}
            array = simplejpeg.decode_jpeg(data, colorspace="RGB", **kwargs)  # (H, W, 3) uint8, strict
            return torch.from_numpy(array).permute(2, 0, 1)
        from torchvision.io import ImageReadMode, decode_jpeg

        size = jpeg_size(data)
        if size is None or size[0] * size[1] > MAX_IMAGE_PIXELS:
            raise ValueError("not a JPEG header, or too large: Pillow names it")

        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
