"""Two independent towers with projections to a shared embedding space (no fusion)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cots.models.image_tower import ImageTower
from cots.models.text_tower import TextTower


@dataclass
class TowerOutput:
    """Features of one modality. B = batch, T = tokens, W = tower width, D = embedding dim."""

    embedding: torch.Tensor  # B x D, L2-normalised z
    cls: torch.Tensor  # B x W, global feature h
    tokens: torch.Tensor  # B x T x W, hidden states


class TwoStreamEncoder(nn.Module):
    """Image and text towers, each followed by a linear projection to D and L2 normalisation.

    Args:
        image_tower, text_tower: the towers.
        embed_dim: D.
    """

    def __init__(self, image_tower: ImageTower, text_tower: TextTower, embed_dim: int = 256) -> None:
        super().__init__()
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.embed_dim = embed_dim
        self.image_proj = nn.Linear(image_tower.width, embed_dim)
        self.text_proj = nn.Linear(text_tower.width, embed_dim)

    def encode_image(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None) -> TowerOutput:
        cls, tokens = self.image_tower(images, patch_mask)
        return TowerOutput(F.normalize(self.image_proj(cls), dim=-1), cls, tokens)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TowerOutput:
        cls, tokens = self.text_tower(input_ids, attention_mask)
        return TowerOutput(F.normalize(self.text_proj(cls), dim=-1), cls, tokens)
