"""A single-stream (cross-encoder) image-text scorer, the baseline of the two-stream speed claim.

One transformer over the concatenated ``[CLS]; image patch tokens; text tokens`` sequence gives a
match score per (image, caption) pair, so retrieval over N images x M captions runs it N*M times
(UNITER / ViLT style). Built from timm's ``Block`` (fused ``scaled_dot_product_attention``).
"""

from __future__ import annotations

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


class CrossEncoder(nn.Module):
    """Joint transformer over image patches and caption tokens, scoring each pair.

    Args:
        image_size, patch_size: the image grid (as the two-stream image tower).
        vocab_size, max_text_len: the caption side.
        width, depth, num_heads: the joint transformer.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        vocab_size: int,
        max_text_len: int,
        width: int,
        depth: int,
        num_heads: int,
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(image_size, patch_size, 3, width)
        num_patches = self.patch_embed.num_patches
        self.word_embed = nn.Embedding(vocab_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.image_pos = nn.Parameter(torch.randn(1, num_patches, width) * 0.02)
        self.text_pos = nn.Parameter(torch.randn(1, max_text_len, width) * 0.02)
        self.type_embed = nn.Parameter(torch.randn(2, width) * 0.02)  # image, text
        self.blocks = nn.Sequential(*[Block(width, num_heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """Scores of aligned pairs: images (B, 3, H, W), input_ids (B, L) -> (B,)."""
        patches = self.patch_embed(images) + self.image_pos + self.type_embed[0]  # B x P x W
        words = self.word_embed(input_ids) + self.text_pos[:, : input_ids.shape[1]] + self.type_embed[1]  # B x L x W
        cls = self.cls_token.expand(images.shape[0], -1, -1)
        x = self.blocks(torch.cat([cls, patches, words], dim=1))  # B x (1 + P + L) x W
        return self.head(self.norm(x[:, 0])).squeeze(-1)

    @property
    def describe(self) -> str:
        block = self.blocks[0]
        return (
            f"depth {len(self.blocks)}, width {self.norm.normalized_shape[0]}, heads {block.attn.num_heads}, "
            f"{self.patch_embed.num_patches} patches + text"
        )


def cross_encoder_like(encoder: nn.Module, max_text_len: int) -> CrossEncoder:
    """A cross-encoder as big as a :class:`~cots.models.two_stream.TwoStreamEncoder`'s towers together.

    Depth = image layers + text layers, width = the wider tower (64-wide heads), same image grid and vocabulary.
    """
    vit, bert = encoder.image_tower.vit, encoder.text_tower.bert
    width = max(encoder.image_tower.width, encoder.text_tower.width)
    return CrossEncoder(
        image_size=vit.patch_embed.img_size[0],
        patch_size=vit.patch_embed.patch_size[0],
        vocab_size=bert.config.vocab_size,
        max_text_len=max_text_len,
        width=width,
        depth=len(vit.blocks) + bert.config.num_hidden_layers,
        num_heads=max(1, width // 64),
    )
