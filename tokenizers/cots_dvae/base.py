"""The image tokenizer interface: frozen pixels -> discrete token ids (MIM targets)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from .arch import DOWNSAMPLE


def dvae_input_size(image_size: int, patch_size: int, downsample: int = DOWNSAMPLE) -> int:
    """Pixels the dVAE must see so that its grid matches the ViT's patch grid.

    Args:
        image_size: side of the ViT input crop, e.g. 224.
        patch_size: ViT patch side, e.g. 16.
        downsample: dVAE downsampling factor (``DOWNSAMPLE``, 8 for the DALL-E dVAE).

    Returns:
        ``(image_size // patch_size) * downsample``, e.g. 224/16*8 = 112.
    """
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    return image_size // patch_size * downsample


class ImageTokenizer(nn.Module, ABC):
    """A frozen module that maps images to a grid of token ids.

    Subclasses set ``vocab_size``, ``input_size`` and ``downsample`` and implement
    ``preprocess`` and ``logits``. The module is frozen at construction: parameters
    do not require grad, it stays in eval mode (``train()`` is a no-op), and
    ``tokenize`` runs in float32 under ``no_grad`` whatever autocast is active
    around it, so targets do not depend on the trainer's precision.
    """

    vocab_size: int
    input_size: int
    downsample: int

    def freeze(self) -> None:
        """Make the module untrainable; subclasses call it at the end of ``__init__``."""
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> ImageTokenizer:
        # Lightning calls model.train() every epoch; dropout/BN-like behaviour and
        # the frozen state must not change with it.
        return super().train(False)

    def grid_size(self, image_size: int | None = None) -> int:
        """Tokens per side for a dVAE input of ``image_size`` pixels.

        Args:
            image_size: side in pixels at the dVAE's resolution; default
                ``input_size``, which is what ``tokenize`` always resizes to.
        """
        size = self.input_size if image_size is None else image_size
        if size % self.downsample:
            raise ValueError(f"image size {size} is not a multiple of the dVAE downsampling {self.downsample}")
        return size // self.downsample

    @abstractmethod
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Model-specific preprocessing.

        Args:
            images: float (B, 3, H, W) in [0, 1] (NOT ImageNet-normalised).

        Returns:
            float32 (B, C, input_size, input_size) ready for ``logits``.
        """

    @abstractmethod
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Encoder logits.

        Args:
            pixels: output of ``preprocess``, (B, C, input_size, input_size).

        Returns:
            float32 (B, vocab_size, h, w) with h = w = grid_size().
        """

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids of a batch of images.

        Args:
            images: float (B, 3, H, W) in [0, 1], any H, W (resized to input_size).

        Returns:
            int64 (B, h, w) ids in [0, vocab_size), h = w = grid_size().
        """
        if images.ndim != 4:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        with torch.autocast(device_type=images.device.type, enabled=False):
            return self.logits(self.preprocess(images.float())).argmax(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as ``tokenize``."""
        return self.tokenize(images)
