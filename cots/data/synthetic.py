"""A synthetic image-text set with real structure: coloured shapes in quadrants.

Each image holds two shapes in two different quadrants over a noisy background;
its captions name colour, shape and position of both, in several phrasings, so
that retrieval above chance needs colour, shape and layout to be learnt. It is
written to disk as PNGs + standard JSON manifests and read back by the same
loader as real data. It is built on first use by the data module, so it lives with the
training-time code and imports no builder: its manifests are written with ``json`` directly
(the same bytes as :func:`cots.prepare.manifest_writer.write_manifest`; the whole folder is
renamed into place, so no file needs its own atomic write).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20), "purple": (150, 50, 190), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], colour: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)
    else:  # cross
        w, h = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=colour)
        draw.rectangle((x0, y0 + h, x1, y1 - h), fill=colour)


def render_item(rng: np.random.Generator, size: int) -> tuple[Image.Image, list[str]]:
    """One image (size x size RGB) and its captions."""
    background = rng.integers(200, 256, size=(size, size, 3), dtype=np.uint8)
    img = Image.fromarray(background)
    draw = ImageDraw.Draw(img)
    quadrants = rng.choice(len(QUADRANTS), size=2, replace=False)
    objects = []
    for q in quadrants:
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        half = size / 2
        extent = half * rng.uniform(0.55, 0.9)
        ox = (q % 2) * half + rng.uniform(0, half - extent)
        oy = (q // 2) * half + rng.uniform(0, half - extent)
        _draw_shape(draw, shape, (ox, oy, ox + extent, oy + extent), COLOURS[colour])
        objects.append((colour, shape, QUADRANTS[q]))
    (c1, s1, p1), (c2, s2, p2) = objects
    captions = [
        f"a {c1} {s1} at the {p1} and a {c2} {s2} at the {p2}",
        f"{c2} {s2} {p2}, {c1} {s1} {p1}",
        f"{p1}: {c1} {s1}. {p2}: {c2} {s2}",
    ]
    return img, captions


def write_synthetic_split(out_dir: Path, split: str, num_images: int, image_size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng([seed, SPLIT_SEEDS[split]])
    (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(num_images):
        img, captions = render_item(rng, image_size)
        rel = f"images/{split}/{i:06d}.png"
        img.save(out_dir / rel)
        entries.append({"image": rel, "caption": captions})
    return entries


def ensure_synthetic_dataset(
    out_dir: str | Path, num_train: int = 2000, num_val: int = 200, num_test: int = 200, image_size: int = 32, seed: int = 0
) -> Path:
    """Build the set once under ``out_dir`` (train.json, val.json, test.json); reuse it when complete.

    The build goes to a temporary folder renamed into place at the end, so an
    interrupted build leaves nothing half-written, and concurrent builders
    (one per DDP rank) are harmless.
    """
    out_dir = Path(out_dir)
    stamp = f"{num_train}-{num_val}-{num_test}-{image_size}-{seed}"
    marker = out_dir / "COMPLETE"
    if marker.is_file() and marker.read_text() == stamp:
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for split, n in (("train", num_train), ("val", num_val), ("test", num_test)):
            entries = write_synthetic_split(tmp, split, n, image_size, seed)
            (tmp / f"{split}.json").write_text(json.dumps(entries, ensure_ascii=False, indent=0), encoding="utf-8")
        (tmp / "COMPLETE").write_text(stamp)
        if out_dir.exists():
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not (marker.is_file() and marker.read_text() == stamp):  # another rank won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
