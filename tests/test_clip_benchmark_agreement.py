"""Our Recall@K against CLIP_benchmark's zero-shot retrieval recall on the same embeddings (no ties): equal to 1e-9.

CLIP_benchmark (``clip_benchmark.metrics.zeroshot_retrieval``, in the ``test`` extra) names text->image recall
``image_retrieval_recall@K`` (our ``t2i_rK``) and image->text recall ``text_retrieval_recall@K`` (our ``i2t_rK``), as
fractions. For an image it computes the fraction of its captions in the top K and counts the image as found when that
fraction is above 0, i.e. when any caption is there, as we do. Ties: it takes ``torch.topk``'s order, we the
expectation over random orders (README, "Retrieval metrics and ties"), so the two can agree only without ties; the
galleries here are random and checked to have none.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from cots.metrics.retrieval import retrieval_metrics

clip_retrieval = pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")

KS = (1, 5, 10)
MIN_GAP = 1e-9  # the closest two scores of a query may come: far above float64's rounding of a dot product


def _random_gallery(images: int, captions: int, dim: int, seed: int, noise_scale: float = 0.5):
    """float64 unit embeddings; each image has one to several captions (at least one), in a shuffled order."""
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randint(0, images, (captions - images,), generator=generator)  # the captions beyond one each
    text_to_image = torch.cat([torch.arange(images), extra])
    text_to_image = text_to_image[torch.randperm(captions, generator=generator)]
    assert torch.bincount(text_to_image).max() >= 3  # several captions per image, not five for all
    image_emb = F.normalize(torch.randn(images, dim, generator=generator, dtype=torch.float64), dim=1)
    noise = torch.randn(captions, dim, generator=generator, dtype=torch.float64)
    text_emb = F.normalize(image_emb[text_to_image] + noise_scale * noise, dim=1)  # near their images, not on them
    return image_emb, text_emb, text_to_image


def _assert_no_ties(scores: torch.Tensor) -> None:
    """Every query's candidates at distinct scores, in both directions (scores: texts x images)."""
    for block in (scores, scores.t()):
        assert block.sort(dim=1).values.diff(dim=1).min().item() > MIN_GAP


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_equals_clip_benchmark_recall_at_k_to_1e_9(seed):
    image_emb, text_emb, text_to_image = _random_gallery(60, 190, 24, seed)
    scores = text_emb @ image_emb.t()  # CLIP_benchmark's (texts x images) score matrix
    _assert_no_ties(scores)
    positive_pairs = torch.zeros_like(scores, dtype=torch.bool)
    positive_pairs[torch.arange(len(scores)), text_to_image] = True
    ours = retrieval_metrics(image_emb, text_emb, text_to_image, chunk_size=7)
    for k in KS:
        # what its evaluate() computes (recall_at_k per query, > 0: found), averaged here in float64
        t2i = clip_retrieval.batchify(clip_retrieval.recall_at_k, scores, positive_pairs, 16, "cpu", k=k) > 0
        i2t = clip_retrieval.batchify(clip_retrieval.recall_at_k, scores.T, positive_pairs.T, 16, "cpu", k=k) > 0
        assert 0 < t2i.double().mean().item() < 1 and 0 < i2t.double().mean().item() < 1  # not a trivial table
        assert abs(ours[f"t2i_r{k}"] / 100 - t2i.double().mean().item()) < 1e-9
        assert abs(ours[f"i2t_r{k}"] / 100 - i2t.double().mean().item()) < 1e-9


class _EmbeddingModel:
    """A "CLIP-like model" for CLIP_benchmark's evaluate(): an image is its embedding, a caption its row id."""

    def __init__(self, text_emb: torch.Tensor) -> None:
        self.text_emb = text_emb

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_emb[ids]


def test_recall_equals_clip_benchmark_evaluate_end_to_end():
    # 128 images and 512 captions: evaluate() averages its hits in float32, exact for these powers of two
    image_emb, text_emb, text_to_image = _random_gallery(128, 512, 32, seed=3)
    _assert_no_ties(text_emb @ image_emb.t())
    captions = [[] for _ in range(len(image_emb))]  # per image, the ids of its captions: its "texts"
    for text, image in enumerate(text_to_image.tolist()):
        captions[image].append(text)
    batches = [(image_emb[i : i + 32], captions[i : i + 32]) for i in range(0, len(image_emb), 32)]
    theirs = clip_retrieval.evaluate(
        _EmbeddingModel(text_emb), batches, torch.tensor, "cpu", amp=False, recall_k_list=list(KS)
    )
    ours = retrieval_metrics(image_emb, text_emb, text_to_image)  # means over queries: caption order does not matter
    for k in KS:
        assert abs(ours[f"t2i_r{k}"] / 100 - theirs[f"image_retrieval_recall@{k}"]) < 1e-9
        assert abs(ours[f"i2t_r{k}"] / 100 - theirs[f"text_retrieval_recall@{k}"]) < 1e-9


def test_its_metrics_module_loads_no_model_code():
    """Importing the recall code does not bring in open_clip (whose model factories can download weights)."""
    loaded = {name.split(".")[0] for name in sys.modules}
    assert clip_retrieval.__name__ == "clip_benchmark.metrics.zeroshot_retrieval"
    assert "open_clip" not in loaded
