"""Masking (METHOD §4): BEiT block masks, BERT 80/10/10 text masks, and the ViT / dVAE grid check."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from cots.data.text_tokenizer import TextTokenizer, train_wordpiece
from cots.geometry import check_grid
from cots.masking import IGNORE_INDEX, BlockMaskGenerator, TextMasker, block_masks, mask_text_tokens, sample_rng


def connected_components(mask: np.ndarray) -> list[int]:
    """Sizes of the 4-connected True regions of a 2-D bool array."""
    seen = np.zeros_like(mask)
    sizes = []
    for start in zip(*np.nonzero(mask), strict=False):
        if seen[start]:
            continue
        seen[start], queue, size = True, deque([start]), 0
        while queue:
            y, x = queue.popleft()
            size += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        sizes.append(size)
    return sizes


def test_block_mask_statistics_at_24x24():
    gen = BlockMaskGenerator(24, mask_ratio=0.4, min_num_patches=16)
    assert gen.num_masking_patches == 230
    ratios = []
    for seed in range(200):
        mask, blocks = gen.generate(sample_rng(seed))
        assert mask.shape == (24, 24) and mask.dtype == bool
        assert mask.sum() <= gen.num_masking_patches
        ratios.append(mask.mean())
        # The recorded rectangles are exactly the mask, each honours the size and aspect limits.
        union = np.zeros_like(mask)
        for b in blocks:
            union[b.top : b.top + b.height, b.left : b.left + b.width] = True
            assert b.area >= 16
            assert 0.3 <= b.height / b.width <= 1 / 0.3
        assert np.array_equal(union, mask)
        assert min(connected_components(mask)) >= 16
    mean = float(np.mean(ratios))
    assert 0.37 <= mean <= 0.41, mean  # BEiT stops a little short of the budget when no block fits
    assert min(ratios) > 0.3


def test_block_masks_are_seeded_and_batched():
    gen = BlockMaskGenerator((24, 24), min_num_patches=16)
    a = block_masks(gen, 4, sample_rng(0, 1, 2))
    b = block_masks(gen, 4, sample_rng(0, 1, 2))
    assert a.shape == (4, 576) and a.dtype == torch.bool
    assert torch.equal(a, b)
    assert not torch.equal(a, block_masks(gen, 4, sample_rng(0, 1, 3)))
    assert not torch.equal(a[0], a[1])
    # Row-major flattening, like the ViT patch sequence.
    mask = gen(sample_rng(5))
    assert torch.equal(block_masks(gen, 1, sample_rng(5)), torch.from_numpy(gen(sample_rng(5)).reshape(1, -1)))
    assert mask.reshape(-1)[24] == mask[1, 0]


def test_block_mask_rejects_impossible_settings():
    with pytest.raises(ValueError, match="min_num_patches=30"):
        BlockMaskGenerator(8, mask_ratio=0.4, min_num_patches=30)  # budget is 26
    with pytest.raises(ValueError, match="mask_ratio"):
        BlockMaskGenerator(8, mask_ratio=1.0)


SPECIAL = [0, 1, 2, 3, 4]  # pad, unk, cls, sep, mask
PAD, CLS, SEP, MASK, VOCAB = 0, 2, 3, 4, 100


def _caption_batch(batch: int, length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] w1..wn [SEP] [PAD]..., n random in [0, length - 2], words among the non-special ids."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch, length), generator=gen)
    lengths = torch.randint(0, length - 1, (batch,), generator=gen)
    pos = torch.arange(length)[None, :]
    ids = torch.where(pos == 0, CLS, ids)
    ids = torch.where(pos == lengths[:, None] + 1, SEP, ids)
    attention = (pos <= lengths[:, None] + 1).long()
    ids = torch.where(attention.bool(), ids, PAD)
    ids[0, 1] = 1  # an [UNK] inside a caption: special, never masked
    return ids, attention


def test_text_masking_statistics_and_specials():
    ids, attention = _caption_batch(4000, 24)
    maskable = attention.bool() & (ids >= 5)
    masked, labels = mask_text_tokens(ids, attention, MASK, SPECIAL, VOCAB, torch.Generator().manual_seed(0))
    chosen = labels != IGNORE_INDEX

    # Labels are the originals where chosen; nothing outside the maskable positions is touched.
    assert torch.equal(labels[chosen], ids[chosen])
    assert not (chosen & ~maskable).any()
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert not torch.isin(masked[chosen & (masked != MASK)], torch.tensor(SPECIAL)).any()
    # At least one prediction per caption with a maskable token, none in captions without.
    has_words = maskable.any(dim=1)
    assert (chosen.sum(dim=1)[has_words] >= 1).all() and not chosen[~has_words].any()

    long = maskable.sum(dim=1) >= 7  # p * n >= 1: stochastic rounding is unbiased
    ratio = chosen[long].sum() / maskable[long].sum()
    assert abs(float(ratio) - 0.15) < 0.01, float(ratio)
    n = int(chosen.sum())
    to_mask = float((masked[chosen] == MASK).sum()) / n
    kept = float((masked[chosen] == ids[chosen]).sum()) / n
    random = 1 - to_mask - kept
    assert abs(to_mask - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / 95)) < 0.015 and abs(random - 0.1 * 94 / 95) < 0.015


def test_text_masking_is_seeded():
    ids, attention = _caption_batch(8, 16)
    a = mask_text_tokens(ids, attention, MASK, SPECIAL, VOCAB, torch.Generator().manual_seed(3))
    b = mask_text_tokens(ids, attention, MASK, SPECIAL, VOCAB, torch.Generator().manual_seed(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=False))


def test_text_masker_from_a_real_tokenizer():
    captions = ["a red circle at the top left", "a blue square", "green cross and yellow triangle"] * 4
    tok = TextTokenizer(train_wordpiece(captions, vocab_size=60), max_length=16)
    masker = TextMasker.from_tokenizer(tok)
    ids, attention = tok(captions + [""])
    masked, labels = masker(ids, attention, torch.Generator().manual_seed(0))
    specials = torch.tensor(tok.special_ids)
    chosen = labels != IGNORE_INDEX
    assert not torch.isin(ids[chosen], specials).any()
    assert (chosen.sum(dim=1)[:-1] >= 1).all() and not chosen[-1].any()  # "" is [CLS] [SEP] only
    assert torch.equal(masked[~chosen], ids[~chosen])
    assert int(masked.max()) < tok.vocab_size


def test_check_grid_names_the_keys():
    assert check_grid(384, 16, 192) == 24
    assert check_grid(64, 8, 64) == 8
    with pytest.raises(ValueError) as err:
        check_grid(384, 16, 224)
    message = str(err.value)
    assert "data.image_size / model.encoder.image_tower.patch_size = 384 / 16 = 24" in message
    assert "data.image_tokens.dvae_input_size=192" in message
    with pytest.raises(ValueError, match="not a multiple of model.encoder.image_tower.patch_size"):
        check_grid(380, 16, 192)
    with pytest.raises(ValueError, match="--dvae-size=100 is not a multiple"):
        check_grid(384, 16, 100, keys=("--image-size", "--patch-size", "--dvae-size"))
