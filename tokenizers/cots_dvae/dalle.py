"""The DALL-E dVAE encoder as a frozen image tokenizer (BEiT-style MIM targets)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from dall_e import map_pixels

from .arch import DOWNSAMPLE, DVAEArch, build_encoder, load_strict
from .base import ImageTokenizer
from .weights import load_weights


class DalleTokenizer(ImageTokenizer):
    """``dall_e.Encoder`` + argmax, loaded from safetensors (never from pickle).

    Args:
        weights: ``.safetensors`` file from ``cots-dvae convert`` or
            ``cots-dvae train``. None builds a randomly initialised encoder
            (only for tests and smoke runs: its tokens carry no meaning).
        input_size: pixels the encoder sees; must be grid * 8 where grid is the
            ViT patch grid (see ``dvae_input_size``). Default: the resolution
            stored in the file (trained dVAEs); required otherwise.
        n_hid, n_blk_per_group, vocab_size, input_channels: architecture. Read from
            the file when ``weights`` is given (then an explicit value that
            disagrees is an error); official DALL-E defaults otherwise.
        map_location: device the weights are read to.
    """

    downsample: int = DOWNSAMPLE

    def __init__(
        self,
        weights: str | Path | None = None,
        input_size: int | None = None,
        n_hid: int | None = None,
        n_blk_per_group: int | None = None,
        vocab_size: int | None = None,
        input_channels: int | None = None,
        map_location: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        given = {
            "n_hid": n_hid,
            "n_blk_per_group": n_blk_per_group,
            "vocab_size": vocab_size,
            "input_channels": input_channels,
        }
        requested: dict[str, int] = {k: v for k, v in given.items() if v is not None}
        if weights is None:
            arch, state, file_size = DVAEArch(**requested), None, None
        else:
            loaded = load_weights(weights, device=map_location)
            arch, state, file_size = loaded.arch, loaded.encoder, loaded.input_size
            wrong = {k: (v, getattr(arch, k)) for k, v in requested.items() if getattr(arch, k) != v}
            if wrong:
                detail = ", ".join(f"{k}={v} but file has {f}" for k, (v, f) in wrong.items())
                raise ValueError(f"{weights}: architecture mismatch: {detail}")
        size = input_size if input_size is not None else file_size
        if size is None:
            raise ValueError(
                f"input_size is required (the file does not record one): use the ViT patch grid * {DOWNSAMPLE}, "
                "e.g. 112 for a 224-px ViT with 16-px patches"
            )
        if size % self.downsample:
            raise ValueError(f"input_size {size} is not a multiple of {self.downsample}")

        self.arch = arch
        self.vocab_size = arch.vocab_size
        self.input_size = int(size)
        self.encoder = build_encoder(arch)
        if state is not None:
            load_strict(self.encoder, state, str(weights))
        self.freeze()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to ``input_size`` and apply ``dall_e.map_pixels``.

        Args:
            images: float (B, C, H, W) in [0, 1].

        Returns:
            float32 (B, C, input_size, input_size) in [0.1, 0.9].
        """
        x = images.float()
        if x.shape[-2:] != (self.input_size, self.input_size):
            # antialias: the dVAE usually sees a downscaled copy of the ViT crop.
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=True
            ).clamp_(0, 1)
        return map_pixels(x)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder logits (B, vocab_size, input_size/8, input_size/8), float32."""
        return self.encoder(pixels)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, input_size={self.input_size}, grid={self.grid_size()}"
