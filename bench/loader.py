"""Loader throughput: decoded and augmented pairs/s of one DataLoader worker process, from JPEG shards.

Writes realistic JPEGs (photo-like gradients, edges and noise, quality 95) of two sizes into
img2dataset-style shards (``<key>.jpg``, ``<key>.txt``, ``<key>.json``), indexes them with
``cots-data index-shards``'s code, then times :class:`cots.data.shards.ShardPairs` end to end (tar
reading, decoding, the random resized crop at 224 and 384 px, float conversion and normalisation) on
one process with one torch thread, as a DataLoader worker runs, for each decoder of
:mod:`cots.data.decode`. The workers needed per GPU are the paper-scale step's pairs/s
(``bench/results/step_paper_*.json``: batch / median step time) over one worker's pairs/s.

    python bench/loader.py                       # writes bench/results/loader.{md,json}
    python bench/loader.py --images 64 --repeats 1 --out /tmp/loader   # a quick look
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import re
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, ImageDraw, features

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cots.data.decode import Decoder  # noqa: E402
from cots.data.images import build_train_transform  # noqa: E402
from cots.data.shards import ShardPairs  # noqa: E402
from cots.prepare.shard_indexer import index_shards  # noqa: E402

SOURCES = {"512x384": (512, 384), "1024x768": (1024, 768)}  # img2dataset keep_ratio 384; CC3M-like originals
DECODERS = [("pillow", False), ("pillow", True), ("simplejpeg", False), ("simplejpeg", True), ("torchvision", False)]


def photo_jpeg(seed: int, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth gradients, a few shapes with edges, texture noise; quality 95."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, f = rng.uniform(0, 255), rng.uniform(-120, 120), rng.uniform(2, 8)
        pixels[..., c] = a + b * np.sin(x / width * f + c) * np.cos(y / height * f / 2)
    image = Image.fromarray(np.clip(pixels + rng.normal(0, 6, pixels.shape), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        box = [x0, y0, x0 + rng.integers(20, width // 2), y0 + rng.integers(20, height // 2)]
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=95)
    return out.getvalue()


def write_shards(folder: Path, size: tuple[int, int], images: int, per_shard: int) -> float:
    """img2dataset-style shards of ``images`` JPEGs; returns the mean JPEG size in kB."""
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for shard in range(math.ceil(images / per_shard)):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(shard * per_shard, min(images, (shard + 1) * per_shard)):
                key = f"{i:09d}"
                data = photo_jpeg(i, *size)
                total += len(data)
                members = {
                    "jpg": data,
                    "txt": f"a photo number {i}".encode(),
                    "json": json.dumps({"key": key}).encode(),
                }
                for ext, blob in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    index_shards([str(folder)], workers=1, log=lambda _: None)
    return total / images / 1e3


def one_pass(folder: Path, image_size: int, decoder: Decoder, epoch: int) -> float:
    """Pairs/s of one pass over the shards (one process, one thread)."""
    pairs = ShardPairs(
        str(folder), build_train_transform(image_size, scale=(0.5, 1.0)), seed=0, shuffle_buffer=1, decoder=decoder
    )
    pairs.set_epoch(epoch)
    start = time.perf_counter()
    count = sum(1 for _ in pairs)
    return count / (time.perf_counter() - start)


def measure(folder: Path, image_size: int, repeats: int) -> dict[str, list[float]]:
    """Pairs/s of each decoder, ``repeats`` passes each, the decoders taking turns (round robin), so that
    other jobs on the machine slow them alike; one untimed pass first (page cache, allocator)."""
    decoders = {
        name + (" + reduce" if reduce else ""): Decoder(name, (image_size, 0.5) if reduce else None)
        for name, reduce in DECODERS
    }
    for decoder in decoders.values():
        one_pass(folder, image_size, decoder, 0)
    rates: dict[str, list[float]] = {label: [] for label in decoders}
    for epoch in range(1, repeats + 1):
        for label, decoder in decoders.items():
            rates[label].append(one_pass(folder, image_size, decoder, epoch))
    return rates


def paper_steps() -> list[dict]:
    """Paper-scale full-step throughput of each measured card, from step_paper_*.json's tables."""
    rows = []
    for path in sorted((ROOT / "bench" / "results").glob("step_paper_*.json")):
        record = json.loads(path.read_text())
        full = next(r for r in record["rows"] if r["step"] == "full")
        match = re.search(r"\| paper \| full \| (\d+) \|", record.get("table", ""))
        batch = int(match.group(1)) if match else int(record["args"].get("batch") or 96)
        gpu = record["machine"].get("gpu", "?")
        rows.append({"file": path.name, "gpu": gpu, "batch": batch, "pairs_per_s": batch / full["median_s"]})
    return rows


def available() -> dict:
    info = {"pillow": f"{PIL.__version__} (libjpeg-turbo {features.version('jpg')})"}
    for name in ("simplejpeg", "torchvision"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    info["pillow-simd"] = "not measured: it replaces Pillow in the environment (a separate install)"
    info["DALI"] = "not measured: needs a GPU (none on this machine)"
    return info


def markdown(result: dict) -> str:
    lines = [
        "# Loader throughput (`bench/loader.py`)",
        "",
        f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['cores']} cores, "
        f"load average {result['machine']['load_before']} before), torch {result['machine']['torch']}, "
        "one process with one torch thread per measurement (a DataLoader worker). Pairs/s: decoded, cropped "
        f"(random resized crop, scale 0.5-1), normalised pairs from indexed JPEG shards: median of {result['repeats']} "
        "passes (best in brackets), the decoders taking turns so that the other jobs on this shared machine slow "
        "them alike. `reduce`: DCT-scaled decoding (`data.jpeg_reduce=true`; it applies only where the smallest "
        "crop is still at least 2x the output size, so not to 512x384 JPEGs).",
        "",
        "Decoders: " + "; ".join(f"{k} {v}" for k, v in result["available"].items()) + ".",
        "",
        "| JPEGs | mean kB | px | decoder | pairs/s per worker | vs Pillow |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['source']} | {row['jpeg_kb']:.0f} | {row['image_size']} | {row['decoder']} | "
            f"{row['median']:.0f} ({row['best']:.0f}) | {row['speedup']:.2f}x |"
        )
    lines += [
        "",
        "Workers per GPU to keep up with the paper-scale step (ViT-B/16 at 384 + BERT-base, full objective; "
        "`bench/results/step_paper_*.json`), 384 px, from the fastest decoder without `reduce` (same pixels as "
        "Pillow) and from plain Pillow:",
        "",
        "| step file | card | batch | pairs/s | JPEGs | workers (fastest exact) | workers (Pillow) |",
        "|---|---|---:|---:|---|---:|---:|",
    ]
    for row in result["workers"]:
        lines.append(
            f"| {row['file']} | {row['gpu']} | {row['batch']} | {row['pairs_per_s']:.0f} | {row['source']} | "
            f"{row['workers_fastest']} ({row['fastest']}) | {row['workers_pillow']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="JPEGs per source size (default 128)")
    parser.add_argument("--repeats", type=int, default=7, help="timed passes per row (default 7)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "loader"), help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = " ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for source, size in SOURCES.items():
            folder = Path(tmp) / source
            kb = write_shards(folder, size, args.images, per_shard=64)
            for image_size in (224, 384):
                rates = measure(folder, image_size, args.repeats)
                baseline = float(np.median(rates["pillow"]))
                for label, values in rates.items():
                    median = float(np.median(values))
                    rows.append(
                        {
                            "source": source,
                            "jpeg_kb": kb,
                            "image_size": image_size,
                            "decoder": label,
                            "best": max(values),
                            "median": median,
                            "speedup": median / baseline,
                            "passes": values,
                        }
                    )
                    print(
                        f"{source} {image_size} px {label}: median {median:.0f} pairs/s (best {max(values):.0f})",
                        flush=True,
                    )
    workers = []
    for step in paper_steps():
        for source in SOURCES:
            exact = [
                r for r in rows if r["source"] == source and r["image_size"] == 384 and "reduce" not in r["decoder"]
            ]
            fastest = max(exact, key=lambda r: r["median"])
            pillow = next(r for r in exact if r["decoder"] == "pillow")
            workers.append(
                {
                    **step,
                    "source": source,
                    "fastest": fastest["decoder"],
                    "workers_fastest": math.ceil(step["pairs_per_s"] / fastest["best"]),
                    "workers_pillow": math.ceil(step["pairs_per_s"] / pillow["best"]),
                }
            )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    result = {
        "command": "python bench/loader.py"
        + ("" if argv is None and len(sys.argv) == 1 else " " + " ".join(argv or sys.argv[1:])),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "load_before": load_before,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "images": args.images,
        "repeats": args.repeats,
        "available": available(),
        "rows": rows,
        "workers": workers,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
