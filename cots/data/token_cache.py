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

This module is the read side a training run needs (:class:`TokenCache`, :func:`cache_paths`);
``cots-dvae cache`` writes caches with :mod:`cots.prepare.token_cache_builder`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

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
                f"`cots-dvae cache --manifest <manifest> --weights <dvae.safetensors> --image-size <px> "
                f"--out {self.path}`"
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
            f"rebuild it with `cots-dvae cache ... --out {self.path}`"
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
