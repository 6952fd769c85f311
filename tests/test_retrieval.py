"""Recall@K against a brute-force reference built from full argsorts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import cots.metrics.retrieval as retrieval
from cots.metrics.ranking import TILE_COLUMNS, TILE_ROWS, QueryRanks, Tiling, TwoWayPass, block_starts, same_scores
from cots.metrics.retrieval import (
    chance_table,
    image_to_text_ranks,
    ranks_both_ways,
    retrieval_metrics,
    rows_per_chunk,
    text_to_image_ranks,
)

RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


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
    # a row of 1000 fp32 scores (4000 bytes), a copy of it and its comparison (bool + int64 sum: 9000 bytes)
    assert rows_per_chunk(1000, 4, 17_000 / 2**20) == 1 and rows_per_chunk(1000, 4, 34_000 / 2**20) == 2
    # wider galleries are scored TILE_COLUMNS columns at a time; at most TILE_ROWS rows (cache-sized tiles)
    assert rows_per_chunk(10**6, 4, 17 * TILE_COLUMNS * 3 / 2**20) == 3 and rows_per_chunk(10**6, 4, 512) == TILE_ROWS
    for ranks in (image_to_text_ranks, text_to_image_ranks):
        tiny = ranks(images, texts, text_to_image, chunk_size=None, memory_budget_mb=1e-4)
        big = ranks(images, texts, text_to_image, chunk_size=None, memory_budget_mb=512)
        chunked = ranks(images, texts, text_to_image, chunk_size=5)
        for field in ("better", "tied", "positives"):
            assert torch.equal(getattr(tiny, field), getattr(big, field))
            assert torch.equal(getattr(big, field), getattr(chunked, field))
    tiny = retrieval_metrics(images, texts, text_to_image, memory_budget_mb=1e-4)
    assert tiny == retrieval_metrics(images, texts, text_to_image, memory_budget_mb=512)
    assert 0 < tiny["i2t_r1"] < 100 and 0 < tiny["t2i_r1"] < 100


def test_empty_galleries():
    i2t, t2i = ranks_both_ways(torch.randn(3, 4), torch.randn(0, 4), torch.zeros(0, dtype=torch.long))
    assert i2t.positives.tolist() == [0, 0, 0] and len(t2i) == 0  # images without captions are never found
    assert retrieval_metrics(torch.randn(3, 4), torch.randn(0, 4), torch.zeros(0, dtype=torch.long))["i2t_r1"] == 0


def test_images_without_captions_rank_last():
    images, texts = torch.randn(4, 8), torch.randn(6, 8)
    text_to_image = torch.tensor([0, 0, 1, 1, 3, 3])  # image 2 has no caption
    ranks = image_to_text_ranks(images, texts, text_to_image, chunk_size=3)
    assert ranks.better[2] == 6 and ranks.positives[2] == 0  # never found, at any K


@pytest.mark.parametrize("captions_per_image", [1, 5])
@pytest.mark.parametrize("chunk", [3, None])
def test_a_collapsed_model_scores_chance_not_perfect(captions_per_image, chunk):
    """Identical embeddings tie every candidate with the ground truth: expected recall = chance, exactly."""
    n_img = 100 if captions_per_image == 1 else 20
    images = torch.ones(n_img, 8) / 8**0.5
    texts = torch.ones(n_img * captions_per_image, 8) / 8**0.5
    text_to_image = torch.arange(n_img).repeat_interleave(captions_per_image)
    got = retrieval_metrics(images, texts, text_to_image, chunk_size=chunk)
    chance = chance_table(n_img, captions_per_image)
    for key in RECALL_KEYS:
        assert got[key] == pytest.approx(chance[key], abs=1e-9), key
    if captions_per_image == 1:
        assert got["rsum"] == pytest.approx(2 * (1 + 5 + 10))  # 1%, 5%, 10% each way, not 100%


def test_duplicated_images_share_the_hit():
    """Two identical images: a caption of either finds its own first only half the time."""
    basis = torch.eye(10)
    images = basis.clone()
    images[1] = basis[0]  # image 1 duplicates image 0
    texts = images.clone()  # caption i describes image i exactly
    got = retrieval_metrics(images, texts, torch.arange(10), chunk_size=4)
    assert got["t2i_r1"] == pytest.approx(100 * (8 + 0.5 + 0.5) / 10)
    assert got["i2t_r1"] == pytest.approx(100 * (8 + 0.5 + 0.5) / 10)  # image 0 ties its caption with caption 1
    assert got["t2i_r5"] == got["i2t_r5"] == pytest.approx(100.0)


def test_duplicated_captions_share_the_hit_and_any_caption_still_finds_the_image():
    """Images 0 and 1 both have the caption 'a dog' (same embedding); image 1 also has a caption of its own."""
    basis = torch.eye(6)
    images = basis[:4].clone()
    dog = (basis[0] + basis[1]) / 2**0.5
    texts = torch.stack([dog, dog, basis[1], basis[2], basis[3]])  # captions of images 0, 1, 1, 2, 3
    text_to_image = torch.tensor([0, 1, 1, 2, 3])
    i2t = image_to_text_ranks(images, texts, text_to_image)
    # image 0: its caption ties with image 1's copy of it; image 1: its own caption basis[1] is strictly best
    assert i2t.better.tolist() == [0, 0, 0, 0] and i2t.tied.tolist() == [1, 0, 0, 0]
    got = retrieval_metrics(images, texts, text_to_image)
    assert got["i2t_r1"] == pytest.approx(100 * (0.5 + 1 + 1 + 1) / 4)
    assert got["t2i_r1"] == pytest.approx(100 * (0.5 + 0.5 + 1 + 1 + 1) / 5)


@pytest.mark.parametrize("seed", [0, 1])
def test_tie_aware_recall_is_the_mean_over_random_tie_breaks(seed):
    """Scores on a coarse grid (many ties): the closed form equals brute force averaged over random orders."""
    rng = np.random.default_rng(seed)
    n_img = 12
    text_to_image = np.repeat(np.arange(n_img), rng.integers(1, 4, size=n_img))
    images = torch.tensor(rng.integers(0, 2, size=(n_img, 3)), dtype=torch.float64)
    texts = torch.tensor(rng.integers(0, 2, size=(len(text_to_image), 3)), dtype=torch.float64)
    got = retrieval_metrics(images, texts, torch.tensor(text_to_image), chunk_size=5)
    scores = (images @ texts.T).numpy()
    trials = [brute_force(scores + 1e-6 * rng.random(scores.shape), text_to_image) for _ in range(1500)]
    for key in RECALL_KEYS[:-1]:
        assert got[key] == pytest.approx(np.mean([t[key] for t in trials]), abs=1.5), key


def test_ranks_counted_in_column_slices_match(monkeypatch):
    import cots.metrics.ranking as ranking

    images, texts = torch.randn(9, 8), torch.randn(45, 8)
    text_to_image = torch.randperm(45) % 9
    whole = retrieval_metrics(images, texts, text_to_image)
    monkeypatch.setattr(ranking, "TILE_COLUMNS", 4)  # 45 captions / 9 images in slices of 4 columns
    assert retrieval_metrics(images, texts, text_to_image, chunk_size=2) == whole


# -- the tiled pass: exact counts whatever the tiling, the workers, the path and the limit -------------------
def exact_counts(scores: torch.Tensor, text_to_image: torch.Tensor) -> tuple[QueryRanks, QueryRanks]:
    """(better, tied, positives) both ways from the whole score matrix (N x M), by definition."""
    n_img, n_txt = scores.shape
    own = text_to_image[None, :] == torch.arange(n_img)[:, None]  # N x M: caption j is a ground truth of image i
    best = torch.where(own, scores, torch.tensor(float("-inf"), dtype=scores.dtype)).amax(1, keepdim=True)
    i2t = QueryRanks(((scores > best) & ~own).sum(1), ((scores == best) & ~own).sum(1), ((scores == best) & own).sum(1))
    gt = scores.gather(0, text_to_image[None, :])  # 1 x M
    others = ~own
    t2i = QueryRanks(((scores > gt) & others).sum(0), ((scores == gt) & others).sum(0), torch.ones(n_txt).long())
    return i2t, t2i


def capped(ranks: QueryRanks, limit: int | None) -> QueryRanks:
    return QueryRanks.from_counts(ranks.better, ranks.tied + ranks.positives, ranks.positives, limit)


def assert_same_ranks(got: QueryRanks, expected: QueryRanks) -> None:
    for field in ("better", "tied", "positives"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


def grid_gallery(seed: int, n_img: int = 23, max_captions: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Small-integer embeddings (exact scores, many ties), 1..max_captions captions per image, shuffled."""
    gen = torch.Generator().manual_seed(seed)
    text_to_image = torch.arange(n_img).repeat_interleave(torch.randint(1, max_captions + 1, (n_img,), generator=gen))
    text_to_image = text_to_image[torch.randperm(len(text_to_image), generator=gen)]
    images = torch.randint(-2, 3, (n_img, 4), generator=gen).float()
    texts = torch.randint(-2, 3, (len(text_to_image), 4), generator=gen).float() + images[text_to_image]
    return images, texts, text_to_image


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("rows, columns", [(1, 1), (4, 7), (5, 16), (23, 3), (64, 1000)])
@pytest.mark.parametrize("workers", [1, 3])
def test_tiled_counts_are_exact_for_any_tiling_and_workers(seed, rows, columns, workers):
    images, texts, text_to_image = grid_gallery(seed)
    expected = exact_counts(images @ texts.T, text_to_image)
    grid = Tiling.of(images.shape[0], texts.shape[0], rows, columns)
    for limit in (None, 3):
        for sparse in (True, False):
            got = ranks_of_pass(images, texts, text_to_image, grid, limit, workers, sparse)
            for g, e in zip(got, expected, strict=True):
                assert_same_ranks(g, capped(e, limit))


def ranks_of_pass(images, texts, text_to_image, grid, limit, workers, sparse, blocks=None):
    counts = TwoWayPass(images, texts, text_to_image, grid, blocks, limit, workers)
    counts.sparse = sparse
    counts.set_thresholds(counts.ground_truth())
    counts.run()
    assert same_scores(counts.observed, counts.ground_truth())
    i2t = QueryRanks.from_counts(*counts.row_counts.unbind(1), counts.row_positives, limit)
    t2i = QueryRanks.from_counts(*counts.column_counts.unbind(1), counts.column_threshold.isfinite().long(), limit)
    return i2t, t2i


def test_blocks_overlap_at_the_end_so_that_every_tile_has_one_shape():
    assert block_starts(10, 4) == [0, 4, 6] and block_starts(8, 4) == [0, 4] and block_starts(3, 4) == [0]
    grid = Tiling.of(10, 9, 4, 4)
    assert [grid.new_rows(b) for b in range(grid.num_blocks)] == [(0, 4), (4, 8), (8, 10)]
    assert [grid.new_columns(t) for t in range(len(grid.column_starts))] == [(0, 4), (4, 8), (8, 9)]


def test_split_blocks_sum_to_the_whole_pass():
    """Image blocks scored apart (as ranks do): image-side counts side by side, caption-side counts summed."""
    images, texts, text_to_image = grid_gallery(3, n_img=31)
    grid = Tiling.of(images.shape[0], texts.shape[0], 4, 8)
    whole = TwoWayPass(images, texts, text_to_image, grid)
    thresholds = whole.ground_truth()
    parts = [TwoWayPass(images, texts, text_to_image, grid, range(a, b)) for a, b in ((0, 3), (3, 3), (3, 8))]
    assert torch.equal(torch.cat([p.ground_truth() for p in parts]), thresholds)
    for counts in (whole, *parts):
        counts.set_thresholds(thresholds)
        counts.run()
    assert torch.equal(torch.cat([p.row_counts for p in parts]), whole.row_counts)
    assert torch.equal(sum(p.column_counts for p in parts), whole.column_counts)


def test_thresholds_that_the_tiles_do_not_reproduce_are_counted_again(monkeypatch):
    images, texts, text_to_image = grid_gallery(4)
    whole = retrieval_metrics(images, texts, text_to_image, chunk_size=5)
    ground_truth = TwoWayPass.ground_truth
    monkeypatch.setattr(TwoWayPass, "ground_truth", lambda self: ground_truth(self) + 0.25)  # off for every pair
    assert retrieval_metrics(images, texts, text_to_image, chunk_size=5) == whole
    monkeypatch.setattr(retrieval, "same_scores", lambda a, b: False)  # tiles that change from pass to pass
    with pytest.raises(RuntimeError, match="not reproducible"):
        retrieval_metrics(images, texts, text_to_image, chunk_size=5)


def test_nan_scores_are_never_found_and_the_rest_still_ranks():
    images, texts, text_to_image = grid_gallery(5)
    texts[0] = float("nan")  # caption 0 scores NaN against every image
    i2t, t2i = ranks_both_ways(images, texts, text_to_image, chunk_size=4)
    assert t2i.positives[0] == 0 and t2i.positives[1:].eq(1).all()
    expected_i2t, expected_t2i = exact_counts(images @ texts.T, text_to_image)
    assert_same_ranks(i2t, expected_i2t)  # the image of caption 0 has a NaN threshold: never found
    rest = QueryRanks(expected_t2i.better[1:], expected_t2i.tied[1:], expected_t2i.positives[1:])
    assert_same_ranks(QueryRanks(t2i.better[1:], t2i.tied[1:], t2i.positives[1:]), rest)
