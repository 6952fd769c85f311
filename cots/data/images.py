"""Robust image decoding and the train / eval transforms."""
from __future__ import annotations

import warnings

import torch
from PIL import Image, ImageFile
from torchvision.transforms import v2 as T

# A declared size above this is treated as a decompression bomb and skipped.
MAX_IMAGE_PIXELS = 89_478_485
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
ImageFile.LOAD_TRUNCATED_IMAGES = False

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short key for the skip counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def load_rgb(path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image to RGB; transparency is composited on white; 16-bit, CMYK, palette handled.

    ``draft``: a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 of its size that is still at least
    this (width, height) (libjpeg's DCT scaling: less work than a full decode and a resize).

    Raises:
        BadSample: missing, empty, truncated, undecodable or oversized files.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if draft is not None and img.format == "JPEG":
                    img.draft("RGB", draft)
                img.load()
                return to_rgb(img)
    except FileNotFoundError:
        raise BadSample("missing_file", str(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("too_large", str(path)) from None
    except (OSError, ValueError, SyntaxError) as err:
        raise BadSample("undecodable", f"{path}: {err}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v * (1 / 256)).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def build_train_transform(
    image_size: int, scale: tuple[float, float] = (0.5, 1.0), hflip: float = 0.0, normalize: bool = True
) -> T.Compose:
    """Random resized crop (+ optional horizontal flip; off by default because captions say left/right)."""
    steps = [T.ToImage(), T.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    steps.append(T.ToDtype(torch.float32, scale=True))
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def build_eval_transform(image_size: int, normalize: bool = True) -> T.Compose:
    """Resize the short side, then centre crop."""
    steps = [T.ToImage(), T.Resize(image_size, antialias=True), T.CenterCrop(image_size), T.ToDtype(torch.float32, scale=True)]
    if normalize:
        steps.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return T.Compose(steps)


def eval_transform_spec(image_size: int) -> dict:
    """What :func:`load_rgb` and :func:`build_eval_transform` do, as plain data: an export's ``preprocess.json``,
    for runtimes other than this package (ONNX). An export is refused when its spec differs from this one."""
    return {
        "image_size": image_size,
        "decode": "RGB; alpha and palette transparency composited on white; 16-bit grey scaled to 8 bits",
        "exif_orientation": "not applied (as in training)",
        "resize": {"shorter_side": image_size, "interpolation": "bilinear", "antialias": True},
        "center_crop": image_size,
        "to_float": "uint8 / 255 -> float32 in [0, 1]",
        "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "layout": "channels first: (3, H, W) per image, (B, 3, H, W) batches",
    }
