"""Build a token cache: tokenize every image of a manifest once with a frozen dVAE (METHOD §4).

The layout of the files is described in :mod:`cots.data.token_cache`, which reads them during
training. Building is offline (``cots-dvae cache``): it decodes every image, cuts the centre crop
and ``k`` seeded random crops at the dVAE resolution and records the tokens and the boxes.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cots.data.crops import DEFAULT_RATIO, center_box, crop_view, image_to_uint8, random_resized_box
from cots.data.images import BadSample, load_rgb
from cots.data.manifest import ManifestEntry, load_manifest
from cots.data.token_cache import FORMAT, VERSION, cache_paths, file_sha1
from cots.masking import sample_rng


def variant_boxes(height: int, width: int, crops: int, seed: int, index: int, scale, ratio) -> list[tuple]:
    """Box of every cached variant of image ``index``: the centre crop, then ``crops`` seeded random ones."""
    rng = sample_rng(seed, index)
    return [center_box(height, width)] + [random_resized_box(height, width, rng, scale, ratio) for _ in range(crops)]


class _CacheViews(Dataset):
    """dVAE views (1 + k, 3, s, s) in [0, 1] and their boxes for each manifest image."""

    def __init__(self, entries: list[ManifestEntry], dvae_size: int, crops: int, seed: int, scale, ratio) -> None:
        self.entries, self.dvae_size, self.crops = entries, dvae_size, crops
        self.seed, self.scale, self.ratio = seed, tuple(scale), tuple(ratio)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        variants, size = 1 + self.crops, self.dvae_size
        try:
            image = image_to_uint8(load_rgb(self.entries[index].image))
        except BadSample as bad:
            return {
                "index": index,
                "ok": False,
                "reason": str(bad),
                "views": torch.zeros(variants, 3, size, size),
                "boxes": torch.zeros(variants, 4, dtype=torch.int32),
            }
        boxes = variant_boxes(*image.shape[-2:], self.crops, self.seed, index, self.scale, self.ratio)
        views = torch.stack([crop_view(image, box, size) for box in boxes])  # (1+k) x 3 x s x s
        return {
            "index": index,
            "ok": True,
            "reason": "",
            "views": views,
            "boxes": torch.tensor(boxes, dtype=torch.int32),
        }


def _collate(items: list[dict]) -> dict:
    return {
        "index": torch.tensor([it["index"] for it in items]),
        "ok": [it["ok"] for it in items],
        "reason": [it["reason"] for it in items],
        "views": torch.stack([it["views"] for it in items]),
        "boxes": torch.stack([it["boxes"] for it in items]),
    }


def build_token_cache(
    manifest: str | Path,
    dvae,
    out: str | Path,
    image_size: int,
    image_root: str | Path | None = None,
    crops: int = 0,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = DEFAULT_RATIO,
    seed: int = 0,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    weights: str | Path | None = None,
    log_every: int = 50,
) -> Path:
    """Tokenize every image of ``manifest`` (centre crop + ``crops`` random crops) into a cache.

    Args:
        manifest: JSON/CSV manifest; row i of the cache is its entry i.
        dvae: the frozen dVAE encoder, an ``ImageTokenizer`` (e.g. ``DalleTokenizer``); views are cut at its
            ``input_size``.
        out: tokens file (``.npy``); the boxes file and the JSON sidecar go beside it.
        image_size: ViT input side the cache is meant for; must be a multiple of the token grid.
        image_root: folder image paths are relative to (default: the manifest's).
        crops: k, random resized crops per image besides the centre crop.
        scale, ratio: RandomResizedCrop parameters of the random crops (area fraction, w/h).
        seed: seed of the random crops (crop c of image i is a function of (seed, i)).
        batch_size, num_workers: images per dVAE call, decoding workers.
        device: where the dVAE runs (the cache records it; GPU TF32 may flip near-ties).
        weights: the dVAE's weight file, hashed into the sidecar for validation.
    Returns:
        the tokens path.
    """
    tokens_path, boxes_path, sidecar_path = cache_paths(out)
    entries = load_manifest(manifest, image_root)
    if not entries:
        raise ValueError(f"{manifest}: no images")
    dvae_size = int(dvae.input_size)
    grid = dvae.grid_size()
    if image_size % grid:
        raise ValueError(
            f"--image-size {image_size} is not a multiple of the dVAE grid {grid} "
            f"(input {dvae_size} px / {dvae.downsample})"
        )
    vocab = int(dvae.vocab_size)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    n, variants = len(entries), 1 + crops

    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path.unlink(missing_ok=True)  # the sidecar marks a complete cache: invalidate first
    tmp_tokens = tokens_path.with_name(tokens_path.name + ".tmp")
    tokens = np.lib.format.open_memmap(tmp_tokens, mode="w+", dtype=dtype, shape=(n, variants, grid, grid))
    boxes = np.zeros((n, variants, 4), dtype=np.int32)
    unreadable: dict[int, str] = {}

    dvae = dvae.to(device)
    loader = DataLoader(
        _CacheViews(entries, dvae_size, crops, seed, scale, ratio),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
    )
    start, done = time.time(), 0
    for step, batch in enumerate(loader):
        views = batch["views"]  # b x (1+k) x 3 x s x s
        ids = dvae.tokenize(views.flatten(0, 1).to(device)).cpu()  # b(1+k) x h x w
        rows = batch["index"].numpy()
        tokens[rows] = ids.view(len(rows), variants, grid, grid).numpy().astype(dtype)
        boxes[rows] = batch["boxes"].numpy()
        for i, ok, reason in zip(rows.tolist(), batch["ok"], batch["reason"], strict=False):
            if not ok:
                unreadable[i] = reason
        done += len(rows)
        if log_every and (step + 1) % log_every == 0:
            print(f"token cache: {done}/{n} images, {done / (time.time() - start):.1f} img/s", file=sys.stderr)
    tokens.flush()
    del tokens
    tmp_tokens.replace(tokens_path)
    np.save(boxes_path, boxes)

    meta = {
        "format": FORMAT,
        "version": VERSION,
        "manifest": str(Path(manifest).resolve()),
        "manifest_sha1": file_sha1(manifest),
        "image_root": str(Path(image_root).resolve()) if image_root else None,
        "num_images": n,
        "dvae": str(Path(weights).resolve()) if weights else None,
        "dvae_sha1": file_sha1(weights) if weights else None,
        "vocab_size": vocab,
        "grid": [grid, grid],
        "dvae_input_size": dvae_size,
        "image_size": int(image_size),
        "dtype": np.dtype(dtype).name,
        "variants": variants,
        "crops": {"count": crops, "scale": list(scale), "ratio": list(ratio), "seed": seed},
        "device": str(device),
        "unreadable": unreadable,
        "seconds": round(time.time() - start, 2),
    }
    tmp_sidecar = sidecar_path.with_name(sidecar_path.name + ".tmp")
    tmp_sidecar.write_text(json.dumps(meta, indent=1))
    tmp_sidecar.replace(sidecar_path)
    if unreadable:
        example = next(iter(unreadable.values()))
        print(f"token cache: {len(unreadable)} unreadable image(s), e.g. {example}", file=sys.stderr)
    return tokens_path
