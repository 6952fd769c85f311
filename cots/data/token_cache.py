"""Precomputed dVAE token grids of a manifest's images (METHOD §4: tokenize once per dataset).

Files, for ``--out DIR/train_tokens.npy``:

* ``train_tokens.npy``: tokens, (N, 1 + k, h, w), uint16 when the vocabulary fits (int32
  otherwise), memory-mapped by readers. Variant 0 is the deterministic centre crop, variants
  1..k are seeded random resized crops.
* ``train_tokens.boxes.npy``: int32 (N, 1 + k, 4), the crop of each variant as
  (top, left, height, width) in source pixels, so that the data module cuts the ViT view
  from exactly the box the dVAE saw.
* ``train_tokens.json``: the sidecar (written last; no sidecar = no cache): manifest path and
  sha1, dVAE file and sha1, grid, vocabulary, image count, crop parameters, unreadable images.

Rows follow ``load_manifest`` order (entry index), the index ``ImageTextPairs.pairs`` uses.
"""
from __future__ import annotations

import hashlib
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
from cots.masking import sample_rng

FORMAT = "cots-token-cache"
VERSION = 1


class TokenCacheError(ValueError):
    """A cache that does not match what it is used with; the message names the files."""


def file_sha1(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(tokens .npy, boxes .npy, sidecar .json) of a cache written to ``out``."""
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"token cache path must end in .npy, got {out}")
    stem = out.with_suffix("")
    return out, Path(f"{stem}.boxes.npy"), Path(f"{stem}.json")


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
            return {"index": index, "ok": False, "reason": str(bad),
                    "views": torch.zeros(variants, 3, size, size), "boxes": torch.zeros(variants, 4, dtype=torch.int32)}
        boxes = variant_boxes(*image.shape[-2:], self.crops, self.seed, index, self.scale, self.ratio)
        views = torch.stack([crop_view(image, box, size) for box in boxes])  # (1+k) x 3 x s x s
        return {"index": index, "ok": True, "reason": "", "views": views, "boxes": torch.tensor(boxes, dtype=torch.int32)}


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
    tokenizer,
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
        tokenizer: an ``ImageTokenizer`` (e.g. ``DalleTokenizer``); views are cut at its ``input_size``.
        out: tokens file (``.npy``); the boxes file and the JSON sidecar go beside it.
        image_size: ViT input side the cache is meant for; must be a multiple of the token grid.
        image_root: folder image paths are relative to (default: the manifest's).
        crops: k, random resized crops per image besides the centre crop.
        scale, ratio: RandomResizedCrop parameters of the random crops (area fraction, w/h).
        seed: seed of the random crops (crop c of image i is a function of (seed, i)).
        batch_size, num_workers: images per tokenizer call, decoding workers.
        device: where the tokenizer runs (the cache records it; GPU TF32 may flip near-ties).
        weights: the tokenizer's weight file, hashed into the sidecar for validation.
    Returns:
        the tokens path.
    """
    tokens_path, boxes_path, sidecar_path = cache_paths(out)
    entries = load_manifest(manifest, image_root)
    if not entries:
        raise ValueError(f"{manifest}: no images")
    dvae_size = int(tokenizer.input_size)
    grid = tokenizer.grid_size()
    if image_size % grid:
        raise ValueError(f"--image-size {image_size} is not a multiple of the dVAE grid {grid} (input {dvae_size} px / 8)")
    vocab = int(tokenizer.vocab_size)
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.int32
    n, variants = len(entries), 1 + crops

    tokens_path.parent.mkdir(parents=True, exist_ok=True)
    sidecar_path.unlink(missing_ok=True)  # the sidecar marks a complete cache: invalidate first
    tmp_tokens = tokens_path.with_name(tokens_path.name + ".tmp")
    tokens = np.lib.format.open_memmap(tmp_tokens, mode="w+", dtype=dtype, shape=(n, variants, grid, grid))
    boxes = np.zeros((n, variants, 4), dtype=np.int32)
    unreadable: dict[int, str] = {}

    tokenizer = tokenizer.to(device)
    loader = DataLoader(_CacheViews(entries, dvae_size, crops, seed, scale, ratio), batch_size=batch_size,
                        num_workers=num_workers, collate_fn=_collate)
    start, done = time.time(), 0
    for step, batch in enumerate(loader):
        views = batch["views"]  # b x (1+k) x 3 x s x s
        ids = tokenizer.tokenize(views.flatten(0, 1).to(device)).cpu()  # b(1+k) x h x w
        rows = batch["index"].numpy()
        tokens[rows] = ids.view(len(rows), variants, grid, grid).numpy().astype(dtype)
        boxes[rows] = batch["boxes"].numpy()
        for i, ok, reason in zip(rows.tolist(), batch["ok"], batch["reason"]):
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
        print(f"token cache: {len(unreadable)} unreadable image(s), e.g. {next(iter(unreadable.values()))}", file=sys.stderr)
    return tokens_path


class TokenCache:
    """Read side of a token cache, memory-mapped (cheap to open in every DataLoader worker).

    Each given expectation is checked against the sidecar; a mismatch raises
    :class:`TokenCacheError` naming the cache and the file it disagrees with.

    Args:
        path: the tokens ``.npy`` file (sidecar and boxes beside it).
        manifest: the manifest the data module reads; its sha1 must match the cache's.
        weights: the dVAE file the run uses; its sha1 must match (when the cache recorded one).
        num_images: entries of the manifest as loaded.
        grid: token grid side the model expects (ViT patch grid).
        vocab_size: dVAE vocabulary the CMVM head scores.
        dvae_input_size: resolution the dVAE saw.
    """

    def __init__(
        self,
        path: str | Path,
        manifest: str | Path | None = None,
        weights: str | Path | None = None,
        num_images: int | None = None,
        grid: int | None = None,
        vocab_size: int | None = None,
        dvae_input_size: int | None = None,
    ) -> None:
        self.path, self.boxes_path, self.sidecar_path = cache_paths(path)
        if not self.sidecar_path.is_file() or not self.path.is_file():
            raise FileNotFoundError(
                f"token cache not found or incomplete: {self.path} (sidecar {self.sidecar_path.name}). Build it with "
                f"`cots-tokenizer cache --manifest <manifest> --weights <dvae.safetensors> --image-size <px> --out {self.path}`"
            )
        self.meta = json.loads(self.sidecar_path.read_text())
        if self.meta.get("format") != FORMAT or self.meta.get("version") != VERSION:
            raise TokenCacheError(f"{self.sidecar_path}: not a {FORMAT} v{VERSION} sidecar")
        self.num_images = int(self.meta["num_images"])
        self.variants = int(self.meta["variants"])
        self.grid = tuple(self.meta["grid"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.unreadable = {int(k) for k in self.meta.get("unreadable", {})}
        self._validate(manifest, weights, num_images, grid, vocab_size, dvae_input_size)
        self._tokens: np.ndarray | None = None
        self._boxes: np.ndarray | None = None
        shape = self.tokens.shape
        if shape != (self.num_images, self.variants, *self.grid):
            raise TokenCacheError(f"{self.path}: shape {shape} disagrees with its sidecar {self.sidecar_path.name}")

    def _mismatch(self, what: str, cached, given, other: str) -> TokenCacheError:
        return TokenCacheError(
            f"token cache {self.path} does not match {other}: {what} is {cached!r} in the cache but {given!r} now; "
            f"rebuild it with `cots-tokenizer cache ... --out {self.path}`"
        )

    def _validate(self, manifest, weights, num_images, grid, vocab_size, dvae_input_size) -> None:
        meta = self.meta
        if manifest is not None:
            sha = file_sha1(manifest)
            if sha != meta["manifest_sha1"]:
                raise self._mismatch("the manifest sha1", f"{meta['manifest_sha1']} ({meta['manifest']})", sha, str(manifest))
        if weights is not None and meta.get("dvae_sha1"):
            sha = file_sha1(weights)
            if sha != meta["dvae_sha1"]:
                raise self._mismatch("the dVAE weights sha1", f"{meta['dvae_sha1']} ({meta['dvae']})", sha, str(weights))
        checks = {
            "the image count": (num_images, self.num_images),
            "the token grid": (None if grid is None else (grid, grid) if isinstance(grid, int) else tuple(grid), self.grid),
            "the dVAE vocabulary": (vocab_size, self.vocab_size),
            "the dVAE input size": (dvae_input_size, meta["dvae_input_size"]),
        }
        for what, (given, cached) in checks.items():
            if given is not None and given != cached:
                raise self._mismatch(what, cached, given, "the configuration")

    # Memory maps are opened lazily so that the object pickles into DataLoader workers cheaply.
    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = np.load(self.path, mmap_mode="r")  # N x (1+k) x h x w
        return self._tokens

    @property
    def boxes(self) -> np.ndarray:
        if self._boxes is None:
            self._boxes = np.load(self.boxes_path, mmap_mode="r")  # N x (1+k) x 4
        return self._boxes

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokens": None, "_boxes": None}

    @property
    def crops(self) -> int:
        """k, the random crops per image (variants 1..k); variant 0 is the centre crop."""
        return self.variants - 1

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, key: int | tuple[int, int]) -> torch.Tensor:
        """Tokens of ``image_index`` (centre crop) or ``(image_index, variant)``: LongTensor (h, w)."""
        index, variant = key if isinstance(key, tuple) else (key, 0)
        if not 0 <= variant < self.variants:
            raise IndexError(f"variant {variant} of {self.path}: it holds {self.variants} (centre + {self.crops} crops)")
        return torch.from_numpy(self.tokens[index, variant].astype(np.int64))

    def box(self, index: int, variant: int = 0) -> tuple[int, int, int, int]:
        """(top, left, height, width) in source pixels of the crop the tokens were computed on."""
        return tuple(int(v) for v in self.boxes[index, variant])
