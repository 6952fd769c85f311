"""Recall@K against a brute-force reference built from full argsorts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cots.eval.retrieval import (
    chance_table,
    image_to_text_ranks,
    retrieval_metrics,
    rows_per_chunk,
    text_to_image_ranks,
)


def brute_force(scores: np.ndarray, text_to_image: np.ndarray) -> dict[str, float]:
    n_img, n_txt = scores.shape
    i2t_ranks = []
    for i in range(n_img):
        order = np.argsort(-scores[i], kind="stable")
        positions = [int(np.where(order == t)[0][0]) for t in np.where(text_to_image == i)[0]]
        i2t_ranks.append(min(positions))
    t2i_ranks = []
    for t in range(n_txt):
        order = np.argsort(-scores[:, t], kind="stable")
        t2i_ranks.append(int(np.where(order == text_to_image[t])[0][0]))
    out = {}
    for name, ranks in (("i2t", np.array(i2t_ranks)), ("t2i", np.array(t2i_ranks))):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(np.mean(ranks < k))
    out["rsum"] = sum(out.values())
    out["r_mean"] = out["rsum"] / 6
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_recall_matches_brute_force_with_one_to_five_captions(seed, chunk):
    rng = np.random.default_rng(seed)
    n_img = 40
    captions_per_image = rng.integers(1, 6, size=n_img)
    text_to_image = np.repeat(np.arange(n_img), captions_per_image)
    rng.shuffle(text_to_image)
    images = torch.tensor(rng.normal(size=(n_img, 16)), dtype=torch.float64)
    texts = torch.tensor(rng.normal(size=(len(text_to_image), 16)), dtype=torch.float64)
    # pull captions towards their image so that recalls are neither 0 nor 100
    texts += 0.6 * images[torch.tensor(text_to_image)]
    got = retrieval_metrics(images, texts, torch.tensor(text_to_image), chunk_size=chunk)
    expected = brute_force((images @ texts.T).numpy(), text_to_image)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value), key
    assert 0 < got["i2t_r1"] < 100 and 0 < got["t2i_r1"] < 100


def test_chance_table_matches_random_scores():
    n_img = 50
    text_to_image = torch.arange(n_img).repeat_interleave(5)
    runs = [retrieval_metrics(torch.randn(n_img, 8), torch.randn(5 * n_img, 8), text_to_image) for _ in range(60)]
    chance = chance_table(n_img, 5)
    for key in ("i2t_r5", "t2i_r5"):
        assert np.mean([r[key] for r in runs]) == pytest.approx(chance[key], abs=3.0)


def test_memory_budget_sets_the_chunk_and_leaves_ranks_unchanged():
    rng = np.random.default_rng(3)
    n_img = 37
    text_to_image = torch.tensor(rng.permutation(np.repeat(np.arange(n_img), 5)))
    images = torch.tensor(rng.normal(size=(n_img, 16)), dtype=torch.float32)
    texts = torch.tensor(rng.normal(size=(len(text_to_image), 16)), dtype=torch.float32) + 0.5 * images[text_to_image]
    # 1e-4 MB = 104 bytes: one row per chunk on both sides; 512 MB: a single chunk.
    assert rows_per_chunk(len(text_to_image), 4, 1e-4) == 1 and rows_per_chunk(n_img, 4, 512) >= n_img
    # a row of 1000 fp32 scores (4000 bytes) and its comparison (bool + int64 sum: 9000 bytes)
    assert rows_per_chunk(1000, 4, 13_000 / 2**20) == 1 and rows_per_chunk(1000, 4, 26_000 / 2**20) == 2
    for ranks in (image_to_text_ranks, text_to_image_ranks):
        tiny = ranks(images, texts, text_to_image, chunk_size=None, memory_budget_mb=1e-4)
        big = ranks(images, texts, text_to_image, chunk_size=None, memory_budget_mb=512)
        assert torch.equal(tiny, big) and torch.equal(big, ranks(images, texts, text_to_image, chunk_size=5))
    tiny = retrieval_metrics(images, texts, text_to_image, memory_budget_mb=1e-4)
    assert tiny == retrieval_metrics(images, texts, text_to_image, memory_budget_mb=512)
    assert 0 < tiny["i2t_r1"] < 100 and 0 < tiny["t2i_r1"] < 100


def test_images_without_captions_rank_last():
    images, texts = torch.randn(4, 8), torch.randn(6, 8)
    text_to_image = torch.tensor([0, 0, 1, 1, 3, 3])  # image 2 has no caption
    assert image_to_text_ranks(images, texts, text_to_image, chunk_size=3)[2] == 6


def test_ranks_counted_in_column_slices_match(monkeypatch):
    import cots.eval.retrieval as retrieval

    images, texts = torch.randn(9, 8), torch.randn(45, 8)
    text_to_image = torch.randperm(45) % 9
    whole = retrieval_metrics(images, texts, text_to_image)
    monkeypatch.setattr(retrieval, "COUNT_BLOCK", 4)  # 45 captions / 9 images in slices of 4 columns
    assert retrieval_metrics(images, texts, text_to_image, chunk_size=2) == whole
