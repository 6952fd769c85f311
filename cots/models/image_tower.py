"""Image tower: any timm Vision Transformer, exposing [CLS] and patch tokens.

Patch embeddings chosen by a boolean mask can be replaced by a learnable
``[MASK]`` embedding before the position embedding is added (BEiT), which
CMVM uses; retrieval passes no mask.
"""

from __future__ import annotations

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn


class ImageTower(nn.Module):
    """A timm ViT built by name with overrides.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_384`` or ``vit_tiny_patch16_224``.
        img_size, patch_size, embed_dim, depth, num_heads: overrides of the named architecture (None keeps it).
        drop_path_rate: stochastic depth.
        checkpoint_path: optional local timm checkpoint; nothing is downloaded.
        grad_checkpointing: activation checkpointing of the blocks.
        mask_embedding: create the learnable [MASK] patch embedding (CMVM needs it; without it
            the parameter would get no gradient, which DDP rejects).
    """

    def __init__(
        self,
        name: str = "vit_base_patch16_384",
        img_size: int | None = None,
        patch_size: int | None = None,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        drop_path_rate: float = 0.0,
        checkpoint_path: str | None = None,
        grad_checkpointing: bool = False,
        mask_embedding: bool = False,
    ) -> None:
        super().__init__()
        if not timm.is_model(name):
            raise ValueError(f"unknown timm model '{name}' (model.encoder.image_tower.name)")
        overrides = dict(
            img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads
        )
        overrides = {k: v for k, v in overrides.items() if v is not None}
        self.vit: VisionTransformer = timm.create_model(
            name,
            pretrained=bool(checkpoint_path),
            pretrained_cfg_overlay=dict(file=checkpoint_path) if checkpoint_path else None,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            **overrides,
        )
        if not isinstance(self.vit, VisionTransformer) or self.vit.cls_token is None:
            raise ValueError(f"timm model '{name}' is not a VisionTransformer with a [CLS] token")
        if getattr(self.vit, "dynamic_img_size", False):
            raise ValueError(f"timm model '{name}' uses dynamic_img_size, which the patch mask does not support")
        self.vit.set_grad_checkpointing(grad_checkpointing)
        self.name = name
        self.width = self.vit.embed_dim
        self.grid_size: tuple[int, int] = tuple(self.vit.patch_embed.grid_size)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, self.width)) if mask_embedding else None
        if self.mask_embedding is not None:
            nn.init.trunc_normal_(self.mask_embedding, std=0.02)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def forward(
        self, images: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode images.

        Args:
            images: (B, 3, H, W), normalised.
            patch_mask: (B, P) bool, True where the patch embedding is replaced by [MASK].
        Returns:
            cls: (B, W) the [CLS] feature; tokens: (B, P, W) the patch tokens (prefix tokens removed).
        """
        vit = self.vit
        x = vit.patch_embed(images)  # B x P x W
        if patch_mask is not None:
            if self.mask_embedding is None:
                raise ValueError("a patch mask needs model.encoder.image_tower.mask_embedding=true")
            x = torch.where(patch_mask[..., None], self.mask_embedding.to(x.dtype), x)
        x = vit._pos_embed(x)  # B x (prefix + P) x W
        x = vit.patch_drop(x)
        x = vit.norm_pre(x)
        x = vit.blocks(x) if not vit.grad_checkpointing else timm.models.checkpoint_seq(vit.blocks, x)
        x = vit.norm(x)
        return x[:, 0], x[:, vit.num_prefix_tokens :]
