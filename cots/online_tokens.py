"""CMVM targets on the online path (DESIGN §4): a frozen dVAE tokenizes the batch's dVAE views inside the step.

The token cache serves precomputed targets wherever the crop can be enumerated; random crops
(and flips) need this path. The dVAE is built on first use and kept out of every state dict.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch


class OnlineImageTokens:
    """A frozen ``DalleTokenizer`` that turns dVAE views (B, 3, s, s) into token grids (B, h, w).

    Deliberately not an ``nn.Module``: held as a plain attribute of the objective, the dVAE stays
    out of checkpoints, the optimizer, DDP's parameters and Lightning's ``.to()``; it follows the
    batch to its device once. Tokens are computed in float32 without autocast or gradient
    (``ImageTokenizer.tokenize``).

    Args:
        weights: dVAE ``.safetensors`` (``cots-dvae convert`` / ``train``).
        dvae_input_size: pixels the dVAE sees (the ViT patch grid x 8).
        vocab_size: the vocabulary the CMVM head scores; checked against the file.
        random_dvae: ``{n_hid, n_blk_per_group, seed}`` of a randomly initialised encoder, used when
            ``weights`` is null (geometry checks and tests only: its tokens carry no meaning).
        **_: the other ``data.image_tokens`` keys (``source``, ``cache``, ``block_mask``...), unused here.
    """

    def __init__(
        self,
        weights: str | None = None,
        dvae_input_size: int | None = None,
        vocab_size: int | None = None,
        random_dvae: Mapping | None = None,
        **_,
    ) -> None:
        if weights is None and random_dvae is None:
            raise ValueError("online image tokens need data.image_tokens.weights (or data.image_tokens.random_dvae)")
        self.weights = weights
        self.dvae_input_size = dvae_input_size
        self.vocab_size = vocab_size
        self.random_dvae = dict(random_dvae) if random_dvae is not None else None
        self._tokenizer = None

    def tokenizer(self, device: torch.device | str = "cpu"):
        """The frozen dVAE on ``device`` (built on the first call, moved when the device changes)."""
        if self._tokenizer is None:
            self._tokenizer = self._build()
        if next(self._tokenizer.parameters()).device != torch.device(device):
            self._tokenizer.to(device)
        return self._tokenizer

    def _build(self):
        from cots_dvae import DalleTokenizer

        if self.weights is not None:
            return DalleTokenizer(self.weights, input_size=self.dvae_input_size, vocab_size=self.vocab_size)
        arch = dict(self.random_dvae)
        seed = int(arch.pop("seed", 0))
        # Its own RNG stream: building it lazily must not move the training RNG (exact resume).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DalleTokenizer(input_size=self.dvae_input_size, vocab_size=self.vocab_size, **arch)

    def __call__(self, images_dvae: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) float in [0, 1] -> (B, h, w) long token ids."""
        return self.tokenizer(images_dvae.device).tokenize(images_dvae)
