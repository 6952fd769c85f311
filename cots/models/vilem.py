"""ViLEM's multi-granularity interaction and heads (METHOD §7), used in training only.

The edited caption runs through the first ``M1`` layers of the online text tower with
(a) the image global feature added to every token embedding and (b) a cross-attention
block to the image patch features after each of those layers. The injection and the
cross-attention belong to this module alone: retrieval embeddings never pass through
them, so inference cost and outputs are those of the plain two-stream model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cots.models.mvlm_heads import CMLMHead, GlobalFeatureFusion
from cots.models.text_tower import TextTower


class CrossAttentionBlock(nn.Module):
    """h <- h + Attn(LN(h), LN(P)): text tokens attend to image patch features (pre-norm, residual).

    The output projection starts at zero, so at initialisation the block leaves the
    pretrained text layers' states unchanged; it still gets a gradient from the first step.

    Args:
        text_width: W_t (queries and output).
        image_width: W_v (keys and values).
        num_heads: attention heads; must divide ``text_width``.
    """

    def __init__(self, text_width: int, image_width: int, num_heads: int) -> None:
        super().__init__()
        if text_width % num_heads:
            raise ValueError(f"objective.vilem.num_heads={num_heads} does not divide the text width {text_width}")
        self.num_heads = num_heads
        self.norm_text = nn.LayerNorm(text_width)
        self.norm_image = nn.LayerNorm(image_width)
        self.query = nn.Linear(text_width, text_width)
        self.key_value = nn.Linear(image_width, 2 * text_width)
        self.out = nn.Linear(text_width, text_width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """
        Args:
            text: (B, L, W_t) token states; image: (B, P, W_v) patch features.
        Returns:
            (B, L, W_t).
        """
        batch, length, width = text.shape
        heads = self.num_heads
        q = self.query(self.norm_text(text)).view(batch, length, heads, -1).transpose(1, 2)  # B x H x L x W/H
        k, v = self.key_value(self.norm_image(image)).view(batch, image.shape[1], 2, heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)  # B x H x L x W/H
        return text + self.out(attended.transpose(1, 2).reshape(batch, length, width))


class ErrorModelingHead(nn.Module):
    """Global injection, M1 cross-attention blocks, and the detection and correction heads.

    The text tower is passed to ``forward`` rather than held, so its weights stay registered
    once (under the encoder) and are shared with the retrieval path.

    Args:
        text_tower: the online text tower (for its width, depth and word embeddings).
        image_width: W_v.
        num_layers: M1, the text layers run with interaction (1 .. depth); None = half the depth.
        num_heads: cross-attention heads; None = the text tower's own head count.
    """

    def __init__(
        self, text_tower: TextTower, image_width: int, num_layers: int | None = None, num_heads: int | None = None
    ) -> None:
        super().__init__()
        depth = len(text_tower.bert.encoder.layer)
        num_layers = max(1, depth // 2) if num_layers is None else num_layers
        if not 1 <= num_layers <= depth:
            raise ValueError(f"objective.vilem.layers={num_layers} must be in [1, {depth}] (the text tower's depth)")
        width = text_tower.width
        self.num_layers = num_layers
        self.inject = GlobalFeatureFusion(width, image_width)
        heads = num_heads or text_tower.bert.config.num_attention_heads
        self.cross_attention = nn.ModuleList(CrossAttentionBlock(width, image_width, heads) for _ in range(num_layers))
        self.detector = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 1))
        self.corrector = CMLMHead(width, image_width, text_tower.word_embeddings)

    def forward(
        self,
        text_tower: TextTower,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_global: torch.Tensor,
        image_patches: torch.Tensor,
        replaced: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            input_ids, attention_mask: (B, L) the edited captions.
            image_global: (B, W_v) the image [CLS] of the unmasked pass.
            image_patches: (B, P, W_v) its patch features.
            replaced: (B, L) bool, the positions to correct.
        Returns:
            detection logits (B, L); correction logits (M, V_txt) at the replaced positions (row-major).
        """
        offset = self.inject.proj(image_global)  # B x W_t, the same for every token

        def cross_attend(layer: int, hidden: torch.Tensor) -> torch.Tensor:
            return self.cross_attention[layer](hidden, image_patches)

        states = text_tower.forward_first_layers(input_ids, attention_mask, self.num_layers, offset, cross_attend)
        detection = self.detector(states).squeeze(-1)  # B x L
        correction = self.corrector(states, image_global, replaced)  # M x V_txt
        return detection, correction
