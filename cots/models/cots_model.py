"""The COTS network: online encoders, their momentum twins, the queues and the temperature.

It computes features and keys; losses live in ``cots.losses`` and the
LightningModule orders forward -> filter -> objective -> enqueue.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cots import distributed
from cots.models.two_stream import TowerOutput, TwoStreamEncoder
from cots.momentum import ema_update_, momentum_copy, parameter_pairs
from cots.queues import PairedFeatureQueue

TEMPERATURE_MIN, TEMPERATURE_MAX = 0.001, 0.5


@dataclass
class PairFeatures:
    """Everything one step computes for a batch of B local pairs (G = B x world size)."""

    image: TowerOutput  # online, with gradient
    text: TowerOutput
    image_momentum: torch.Tensor  # B x D, no gradient
    text_momentum: torch.Tensor  # B x D
    image_keys: torch.Tensor  # G x D, momentum features of the global batch (rank order)
    text_keys: torch.Tensor  # G x D
    positive_index: torch.Tensor  # B, column of each local pair's own key among the G keys


class COTSModel(nn.Module):
    """Online two-stream encoder + momentum copy + paired feature queues + learnable temperature.

    Args:
        encoder: the online :class:`TwoStreamEncoder`.
        queue_size: K, past pairs kept in the image and text queues.
        temperature: initial tau (stored as log, clamped to [0.001, 0.5]).
        learn_temperature: whether tau is trained.
    """

    def __init__(
        self, encoder: TwoStreamEncoder, queue_size: int = 65536, temperature: float = 0.07, learn_temperature: bool = True
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.momentum_encoder = momentum_copy(encoder)
        self.feature_queue = PairedFeatureQueue(queue_size, encoder.embed_dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self._ema_pairs: tuple[list, list] | None = None

    @property
    def queue_size(self) -> int:
        return self.feature_queue.size

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(TEMPERATURE_MIN, TEMPERATURE_MAX)

    def train(self, mode: bool = True) -> COTSModel:
        super().train(mode)
        # Keys come from the momentum encoder without dropout: stable targets for the queue.
        self.momentum_encoder.eval()
        return self

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        """One EMA step of every momentum parameter; call once per optimizer step."""
        if self._ema_pairs is None:
            self._ema_pairs = parameter_pairs(self.encoder, self.momentum_encoder)
        ema_update_(*self._ema_pairs, m)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PairFeatures:
        """Online features and gathered momentum keys for a batch.

        Args:
            images: (B, 3, H, W); input_ids, attention_mask: (B, L).
        """
        image = self.encoder.encode_image(images)
        text = self.encoder.encode_text(input_ids, attention_mask)
        with torch.no_grad():
            image_m = self.momentum_encoder.encode_image(images).embedding  # B x D
            text_m = self.momentum_encoder.encode_text(input_ids, attention_mask).embedding  # B x D
            image_keys = distributed.all_gather_no_grad(image_m)  # G x D
            text_keys = distributed.all_gather_no_grad(text_m)  # G x D
        batch = images.shape[0]
        positive_index = distributed.rank() * batch + torch.arange(batch, device=images.device)
        return PairFeatures(image, text, image_m, text_m, image_keys, text_keys, positive_index)

    def queue_keys(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The queues Q^v, Q^t (K, D) and their validity mask (K,): False for slots not yet written."""
        queue = self.feature_queue
        return queue.image.data, queue.text.data, queue.valid_mask()

    def keys_with_queue(self, features: PairFeatures) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[global batch keys ; queue] for both modalities and the validity mask: (G+K, D), (G+K, D), (G+K,)."""
        image_queue, text_queue, queue_valid = self.queue_keys()
        image_keys = torch.cat([features.image_keys, image_queue.to(features.image_keys.dtype)])
        text_keys = torch.cat([features.text_keys, text_queue.to(features.text_keys.dtype)])
        batch_valid = torch.ones(features.image_keys.shape[0], dtype=torch.bool, device=image_keys.device)
        return image_keys, text_keys, torch.cat([batch_valid, queue_valid])

    @torch.no_grad()
    def enqueue(self, features: PairFeatures) -> None:
        """Push the global batch's momentum features; identical on every rank."""
        self.feature_queue.enqueue(features.image_keys, features.text_keys)
