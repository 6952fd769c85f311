"""CMVM's targets (METHOD §4): the dVAE token ids of the crops the masked image pass reads.

Two sources: the token cache (the batch carries ``image_tokens``, precomputed wherever the crop can
be enumerated) or the online path (the batch carries ``images_dvae``, the ViT's own crop at the dVAE's
resolution, and a frozen dVAE tokenizes it inside the step: random crops and flips need it). The dVAE
is built on first use and kept out of every state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class ImageTargets:
    """CMVM targets of a batch: (B, h, w) token ids from the cache, or from a frozen dVAE on the dVAE views.

    Deliberately not an ``nn.Module``: the dVAE stays out of checkpoints, the optimizer, DDP's
    parameters and Lightning's ``.to()``; it follows the batch to its device once. Online tokens are
    computed in float32 without autocast or gradient (``ImageTokenizer.tokenize``).

    Built from ``data.image_tokens`` (the keys below; the others are the data module's).

    The batch says which source it comes from (the data module fills ``image_tokens`` or
    ``images_dvae`` by ``data.image_tokens.source``); the dVAE is only built for the online path.

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

        if self.weights is None and self.random_dvae is None:
            raise ValueError("online CMVM targets need a dVAE: data.image_tokens.weights (or random_dvae)")
        if self.weights is not None:
            return DalleTokenizer(self.weights, input_size=self.dvae_input_size, vocab_size=self.vocab_size)
        arch = dict(self.random_dvae)
        seed = int(arch.pop("seed", 0))
        # Its own RNG stream: building it lazily must not move the training RNG (exact resume).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DalleTokenizer(input_size=self.dvae_input_size, vocab_size=self.vocab_size, **arch)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The batch's targets: ``image_tokens`` (B, h, w) as cached, or its ``images_dvae`` (B, 3, s, s) in
        [0, 1] tokenized now, (B, h, w) long."""
        if "image_tokens" in batch:
            return batch["image_tokens"]
        if "images_dvae" not in batch:
            raise KeyError(
                "objective.cmvm.enabled=true but the batch has neither image tokens nor dVAE views: "
                "set data.image_tokens"
            )
        return self.tokenizer(batch["images_dvae"].device).tokenize(batch["images_dvae"])
