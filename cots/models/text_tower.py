"""Text tower: a Hugging Face BERT from a config (from scratch) or a local pretrained directory."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from cots.local_paths import resolve_local_dir

# A sentence encoder's checkpoint (MiniLM) carries BERT's pooler; the tower has none: the one expected leftover.
EXPECTED_UNUSED = ("pooler.",)


def load_pretrained_bert(path) -> BertModel:
    """A local BERT checkpoint without the pooler, quietly: no progress bar, no load report for the expected
    unused pooler weights. Any other missing, unused or mismatched weight is an error naming it. The weights
    are fp32 whatever the checkpoint stores (transformers 5 keeps a half-precision copy's dtype, and AdamW
    on fp16 parameters loses most updates); mixed precision is the trainer's ``precision``."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        bert, info = BertModel.from_pretrained(
            str(path), add_pooling_layer=False, attn_implementation="sdpa", output_loading_info=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    bert = bert.float()
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(EXPECTED_UNUSED)]
    problems = {
        "missing": list(info.get("missing_keys", [])),
        "unused": unexpected,
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    }
    if any(problems.values()):
        found = "; ".join(
            f"{kind}: {keys[:5]}{' ...' if len(keys) > 5 else ''}" for kind, keys in problems.items() if keys
        )
        raise ValueError(f"model.encoder.text_tower.pretrained={path} does not fit a BERT without pooler ({found})")
    return bert


class TextTower(nn.Module):
    """BERT exposing the [CLS] state and all token states.

    Args:
        pretrained: local directory (or ``package:<module>/<dir>``) with ``config.json`` and weights;
            None builds from the arguments below with random weights.
        vocab_size: must match the text tokenizer (filled in from it when None).
        hidden_size, num_layers, num_heads, intermediate_size, max_length: architecture when from scratch.
        grad_checkpointing: activation checkpointing of the layers.
        trainable_layers: None trains everything; k trains only the top k layers (embeddings and
            lower layers frozen, as in locked-text tuning of a pretrained tower); 0 freezes the tower.
        pooling: the global feature h^t: ``cls`` (the [CLS] state, BERT) or ``mean`` (mean of the
            real tokens' states: what sentence encoders such as MiniLM were trained to produce).
        bert_config: a ``BertConfig`` as a dict (``BertConfig.to_dict()``, what an export's config.json
            holds): that architecture with random weights, nothing read from disk; overrides the
            from-scratch arguments (``pretrained`` must be None).
        length_groups: k > 1 runs ``forward`` on k groups of the batch's captions sorted by length, each
            trimmed to its own longest caption, instead of the whole batch padded to its longest: the
            same features (attention never reads padding), less work when lengths vary (the emoji
            names: 17.8 tokens a batch of 64 padded, 9.8 in 4 groups). It reads the k widths on the
            host (a sync per text pass on a GPU), so it is for CPUs and short captions; 1: off.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        vocab_size: int | None = None,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int | None = None,
        max_length: int = 64,
        dropout: float = 0.1,
        grad_checkpointing: bool = False,
        trainable_layers: int | None = None,
        pooling: str = "cls",
        bert_config: dict | None = None,
        length_groups: int = 1,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean"):
            raise ValueError(f"model.encoder.text_tower.pooling must be 'cls' or 'mean', got '{pooling}'")
        if length_groups < 1:
            raise ValueError(f"model.encoder.text_tower.length_groups must be >= 1, got {length_groups}")
        self.pooling = pooling
        self.length_groups = length_groups
        if pretrained and bert_config is not None:
            raise ValueError("TextTower takes a pretrained directory or a bert_config, not both")
        if pretrained:
            self.bert = load_pretrained_bert(resolve_local_dir(pretrained))
        elif bert_config is not None:
            config = BertConfig.from_dict(dict(bert_config), attn_implementation="sdpa")
            self.bert = BertModel(config, add_pooling_layer=False)
        else:
            if vocab_size is None:
                raise ValueError("model.encoder.text_tower.vocab_size is unset and no tokenizer filled it in")
            config = BertConfig(
                attn_implementation="sdpa",
                vocab_size=vocab_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=intermediate_size or 4 * hidden_size,
                max_position_embeddings=max(max_length, 16),
                hidden_dropout_prob=dropout,
                attention_probs_dropout_prob=dropout,
            )
            self.bert = BertModel(config, add_pooling_layer=False)
        if grad_checkpointing:  # renamed in transformers 5
            enable = (
                getattr(self.bert, "activation_checkpointing_enable", None) or self.bert.gradient_checkpointing_enable
            )
            enable()
        self.width = self.bert.config.hidden_size
        self.vocab_size = self.bert.config.vocab_size
        if trainable_layers is not None:
            self.freeze_below(trainable_layers)

    def freeze_below(self, trainable_layers: int) -> None:
        """Freeze embeddings and all but the top ``trainable_layers`` layers."""
        layers = self.bert.encoder.layer
        if not 0 <= trainable_layers <= len(layers):
            raise ValueError(f"model.encoder.text_tower.trainable_layers={trainable_layers} not in [0, {len(layers)}]")
        self.bert.embeddings.requires_grad_(False)
        for layer in layers[: len(layers) - trainable_layers]:
            layer.requires_grad_(False)

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode token ids.

        Args:
            input_ids: (B, L) long; attention_mask: (B, L), 1 for real tokens.
        Returns:
            global feature: (B, W) ([CLS] state or masked mean, see ``pooling``); tokens: (B, L, W).
        """
        if self.length_groups > 1:
            hidden = self._grouped_states(input_ids, attention_mask)
        else:
            hidden = self._states(input_ids, attention_mask)
        if self.pooling == "cls":
            return hidden[:, 0], hidden
        weights = attention_mask.to(hidden.dtype)[..., None]  # B x L x 1
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0), hidden

    def _states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, W) last hidden states of BERT over (B, L) ids."""
        mask = self._padding_mask(attention_mask)  # None: BERT builds it from the (B, L) mask
        return self.bert(input_ids=input_ids, attention_mask=attention_mask if mask is None else mask).last_hidden_state

    def _grouped_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``_states`` over ``length_groups`` groups of similar length, each trimmed to its longest caption.

        Positions past a group's width come back as zeros (every reader of the token states masks padding).
        """
        batch, length = input_ids.shape
        lengths = attention_mask.sum(1)  # B
        order = torch.argsort(lengths)
        groups = order.chunk(self.length_groups)
        widths = lengths[torch.stack([group[-1] for group in groups])].tolist()  # the one host read
        states = []
        for group, width in zip(groups, widths, strict=True):
            width = max(int(width), 1)
            trimmed = self._states(input_ids[group, :width], attention_mask[group, :width])  # b x width x W
            states.append(F.pad(trimmed, (0, 0, 0, length - width)))
        return torch.cat(states)[torch.argsort(order)]  # B x L x W, back in batch order

    def forward_first_layers(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_layers: int,
        embedding_offset: torch.Tensor | None = None,
        after_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Embeddings and the first ``num_layers`` BERT layers, with hooks for ViLEM's interaction.

        Args:
            input_ids, attention_mask: (B, L).
            embedding_offset: (B, W) added to every token's embedding (an injected global feature).
            after_layer: ``f(i, hidden) -> hidden`` applied after layer i (cross-attention).
        Returns:
            (B, L, W) hidden states after layer ``num_layers - 1``; with all layers and no hooks,
            exactly ``forward``'s token states.
        """
        hidden = self.bert.embeddings(input_ids=input_ids)  # B x L x W
        if embedding_offset is not None:
            hidden = hidden + embedding_offset[:, None, :].to(hidden.dtype)
        mask = self._padding_mask(attention_mask)
        if mask is None:
            mask = self._bert_layer_mask(attention_mask, hidden)
        for i, layer in enumerate(self.bert.encoder.layer[:num_layers]):
            out = layer(hidden, mask)
            hidden = out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple
            if after_layer is not None:
                hidden = after_layer(i, hidden)
        return hidden

    def _padding_mask(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """The (B, 1, L, L) padding mask for SDPA or eager attention, built from the (B, L) tensor alone.

        transformers' own builder first asks whether any token is padding (``mask.all()``), a read of the
        values on the host that stalls a GPU step, in each text pass (tests/test_host_sync.py). None for
        other attention kinds and for transformers 4, whose builders take over.
        """
        try:
            import transformers.masking_utils  # noqa: F401  (transformers 5: layers take a 4-D mask)
        except ImportError:
            return None
        batch, length = attention_mask.shape
        keep = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)  # B x 1 x L(query) x L(key)
        implementation = self.bert.config._attn_implementation
        if implementation == "sdpa":
            return keep
        if implementation == "eager":
            dtype = self.bert.embeddings.word_embeddings.weight.dtype  # what transformers' builder takes
            return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)
        return None

    def _bert_layer_mask(self, attention_mask: torch.Tensor, hidden: torch.Tensor):
        """transformers' own mask for its BERT layers, from the (B, L) mask and the (B, L, W) embeddings."""
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4: an additive (B, 1, 1, L) mask
            return self.bert.get_extended_attention_mask(attention_mask, attention_mask.shape)
        return create_bidirectional_mask(config=self.bert.config, inputs_embeds=hidden, attention_mask=attention_mask)
