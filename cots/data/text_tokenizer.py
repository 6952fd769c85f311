"""Caption tokenizer: a local Hugging Face tokenizer, or WordPiece trained on the captions.

A thin wrapper around a ``tokenizers.Tokenizer`` (fast, picklable for DataLoader
workers, serialisable into checkpoints as a JSON string).
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from cots.local_paths import resolve_local_dir

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class TextTokenizer:
    """Batch tokenisation to padded id tensors.

    Args:
        backend: a ``tokenizers.Tokenizer`` whose post-processor adds [CLS] ... [SEP].
        max_length: truncation length L_max, special tokens included.
    """

    def __init__(self, backend: Tokenizer, max_length: int = 64) -> None:
        self.backend = backend
        self.max_length = max_length
        for token in SPECIAL_TOKENS:
            if backend.token_to_id(token) is None:
                raise ValueError(f"text tokenizer lacks the special token {token}")
        self.pad_id = backend.token_to_id("[PAD]")
        self.cls_id = backend.token_to_id("[CLS]")
        self.sep_id = backend.token_to_id("[SEP]")
        self.mask_id = backend.token_to_id("[MASK]")
        self.unk_id = backend.token_to_id("[UNK]")
        # Pad to the longest caption of each batch (not to max_length): short captions cost less.
        backend.enable_padding(pad_id=self.pad_id, pad_token="[PAD]")
        backend.enable_truncation(max_length)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    @property
    def special_ids(self) -> list[int]:
        return [self.backend.token_to_id(t) for t in SPECIAL_TOKENS]

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns input_ids (B, L) long and attention_mask (B, L) long, L <= max_length."""
        encodings = self.backend.encode_batch(texts)
        ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
        mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
        return ids, mask

    def lengths(self, texts: list[str], chunk: int = 65536) -> list[int]:
        """Tokens of each text as a batch would hold them ([CLS] and [SEP] included, at most max_length).

        Encoded ``chunk`` texts at a time: a web-scale manifest never holds all its encodings at once.
        """
        return [
            sum(e.attention_mask) for start in range(0, len(texts), chunk)
            for e in self.backend.encode_batch(texts[start : start + chunk])
        ]

    def to_str(self) -> str:
        return self.backend.to_str()

    @classmethod
    def from_str(cls, text: str, max_length: int = 64) -> TextTokenizer:
        return cls(Tokenizer.from_str(text), max_length)


def train_wordpiece(captions: Iterable[str], vocab_size: int = 8000, min_frequency: int = 1) -> Tokenizer:
    """A lower-cased BERT-style WordPiece tokenizer whose vocabulary is learnt from ``captions``.

    The vocabulary is every character seen (alone and as a ``##`` continuation, so that any
    word can be spelled) plus the most frequent whole words, ties broken alphabetically.
    It is chosen here rather than by ``tokenizers.trainers.WordPieceTrainer``, whose result
    changes from call to call (ids and, at the size limit, tokens): processes of one DDP run
    must agree on every id, and a resumed run must get the ids it was trained with.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)))
    alphabet = sorted({ch for word in counts for ch in word})
    vocab = list(SPECIAL_TOKENS) + alphabet + [f"##{ch}" for ch in alphabet]
    known = set(vocab)
    for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if len(vocab) >= vocab_size or count < min_frequency:
            break
        if word not in known:
            vocab.append(word)
            known.add(word)
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def load_pretrained_tokenizer(path: str) -> Tokenizer:
    """The fast tokenizer of a local Hugging Face directory (``tokenizer.json`` or ``vocab.txt``)."""
    from transformers import AutoTokenizer  # local import: only this path needs transformers

    directory = resolve_local_dir(path)
    return AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer


def build_text_tokenizer(
    pretrained: str | None, captions: Iterable[str] | None, vocab_size: int = 8000, max_length: int = 64
) -> TextTokenizer:
    """From ``pretrained`` when given, else WordPiece trained on ``captions``."""
    if pretrained:
        return TextTokenizer(load_pretrained_tokenizer(pretrained), max_length)
    if captions is None:
        raise ValueError("data.text_tokenizer.pretrained is unset and there are no captions to train one on")
    return TextTokenizer(train_wordpiece(captions, vocab_size), max_length)
