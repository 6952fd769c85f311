"""Prediction heads of masked vision-language modeling (METHOD §4).

Each head fuses a token state of one stream with the paired modality's global
feature from the unmasked pass, ``H_j + W h`` (a linear map, no cross-attention),
then scores a vocabulary: dVAE codes for CMVM, words for CMLM (decoder tied to
the BERT word embeddings). Both score only the masked positions when given the
mask, which keeps the (positions x vocabulary) logits small.
"""

from __future__ import annotations

import torch
from torch import nn


class GlobalFeatureFusion(nn.Module):
    """fuse(H_j, h) = H_j + W h, the same W h added to every token of a sample.

    W starts at zero, so the heads start as unimodal predictors and learn how much of the
    other stream to use (W still gets a gradient from the first step).

    Args:
        token_width: width of the token states H (W_tok).
        global_width: width of the other stream's global feature h (W_glob).
    """

    def __init__(self, token_width: int, global_width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(global_width, token_width, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(
        self, tokens: torch.Tensor, global_feature: torch.Tensor | None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            tokens: (B, T, W_tok) hidden states of the masked pass.
            global_feature: (B, W_glob) paired global feature ([CLS]) of the unmasked pass; None leaves the
                other stream out (the text-only predictor: ViLEM's default error generator).
            mask: (B, T) bool positions to keep; None keeps all.
        Returns:
            (M, W_tok) fused states of the masked positions in row-major order, or (B, T, W_tok) without a mask.
        """
        fused = tokens if global_feature is None else tokens + self.proj(global_feature)[:, None, :]  # B x T x W_tok
        return fused[mask] if mask is not None else fused


class CMVMHead(nn.Module):
    """Cross-modal masked vision modeling: patch state + text global feature -> dVAE code logits.

    Args:
        width_v: image tower width (patch states).
        width_t: text tower width (the text [CLS] feature).
        image_vocab: dVAE vocabulary size (8192 for DALL-E).
    """

    def __init__(self, width_v: int, width_t: int, image_vocab: int) -> None:
        super().__init__()
        self.fusion = GlobalFeatureFusion(width_v, width_t)
        self.norm = nn.LayerNorm(width_v)
        self.classifier = nn.Linear(width_v, image_vocab)
        nn.init.trunc_normal_(self.classifier.weight, std=0.02)  # BEiT's lm_head init
        nn.init.zeros_(self.classifier.bias)

    def forward(
        self, patch_tokens: torch.Tensor, text_global: torch.Tensor, patch_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            patch_tokens: (B, P, W_v) image tower output of the masked pass.
            text_global: (B, W_t) text [CLS] of the unmasked pass.
            patch_mask: (B, P) bool, True = masked; only those are scored.
        Returns:
            (M, V_img) logits of the masked patches (row-major), or (B, P, V_img) without a mask.
        """
        return self.classifier(self.norm(self.fusion(patch_tokens, text_global, patch_mask)))


class CMLMHead(nn.Module):
    """Cross-modal masked language modeling: token state + image global feature -> word logits.

    BERT's MLM head (dense + GELU + LayerNorm, then a decoder whose weight IS the word
    embedding matrix, with its own bias).

    Args:
        width_t: text tower width (token states).
        width_v: image tower width (the image [CLS] feature).
        text_embeddings: the text tower's word embeddings ``(V_txt, W_t)``, shared with the decoder.
        layer_norm_eps: BERT's 1e-12.
    """

    def __init__(
        self, width_t: int, width_v: int, text_embeddings: nn.Embedding, layer_norm_eps: float = 1e-12
    ) -> None:
        super().__init__()
        vocab_size, embed_width = text_embeddings.weight.shape
        if embed_width != width_t:
            raise ValueError(f"word embeddings are {embed_width} wide but the text tower width is {width_t}")
        self.fusion = GlobalFeatureFusion(width_t, width_v)
        self.dense = nn.Linear(width_t, width_t)
        self.activation = nn.GELU()
        self.norm = nn.LayerNorm(width_t, eps=layer_norm_eps)
        self.decoder = nn.Linear(width_t, vocab_size)
        self.decoder.weight = text_embeddings.weight  # tied: the same Parameter, V_txt x W_t
        nn.init.zeros_(self.decoder.bias)
        nn.init.trunc_normal_(self.dense.weight, std=0.02)
        nn.init.zeros_(self.dense.bias)

    def forward(
        self, token_states: torch.Tensor, image_global: torch.Tensor | None, token_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """
        Args:
            token_states: (B, L, W_t) text tower output on the masked caption.
            image_global: (B, W_v) image [CLS] of the unmasked pass; None: text only.
            token_mask: (B, L) bool positions to score (``labels != -100``).
        Returns:
            (M, V_txt) logits of the masked tokens (row-major), or (B, L, V_txt) without a mask.
        """
        x = self.fusion(token_states, image_global, token_mask)
        return self.decoder(self.norm(self.activation(self.dense(x))))
