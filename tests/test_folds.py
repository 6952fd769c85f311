"""COCO 1K: the test gallery scored as consecutive folds, each with its own images and captions, then averaged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cots.metrics.folds import fold_metrics, fold_table_prefix
from cots.metrics.retrieval import METRIC_KEYS, retrieval_metrics


def _gallery(images: int, per_image: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(torch.randn(images, 16, generator=generator), dim=1)
    text_to_image = torch.arange(images).repeat_interleave(per_image)
    text_emb = F.normalize(image_emb[text_to_image] + 0.8 * torch.randn(len(text_to_image), 16, generator=generator))
    order = torch.randperm(len(text_to_image), generator=generator)  # captions in any order
    return image_emb, text_emb[order], text_to_image[order]


def test_each_fold_is_its_own_gallery_and_the_mean_is_over_folds():
    images, texts, text_to_image = _gallery(50, 5)
    tables = fold_metrics(images, texts, text_to_image, fold_size=10, chunk_size=7)
    assert len(tables.folds) == 5
    for k, table in enumerate(tables.folds):
        own = (text_to_image >= 10 * k) & (text_to_image < 10 * (k + 1))
        expected = retrieval_metrics(images[10 * k : 10 * (k + 1)], texts[own], text_to_image[own] - 10 * k)
        assert table == pytest.approx(expected, abs=1e-12)
    for key in METRIC_KEYS:
        assert tables.mean[key] == pytest.approx(sum(t[key] for t in tables.folds) / 5, abs=1e-12)
    full = retrieval_metrics(images, texts, text_to_image)
    assert tables.mean["rsum"] > full["rsum"]  # a fifth of the distractors
    assert fold_metrics(images, texts, text_to_image, 50).mean == pytest.approx(full, abs=1e-12)
    assert tables.to_json()["per_fold"][0] == tables.folds[0]


def test_folds_must_divide_the_gallery_and_are_named_by_size():
    images, texts, text_to_image = _gallery(12, 2)
    with pytest.raises(ValueError, match="12 images do not split into folds of 5"):
        fold_metrics(images, texts, text_to_image, 5)
    assert fold_table_prefix("test", 1000) == "test_1k" and fold_table_prefix("test", 2) == "test_fold2"
