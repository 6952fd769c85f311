"""Noisy pairs: an exact, seeded, recorded fraction of captions taken from other images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cots.data.datasets import Collate, ImageTextPairs
from cots.data.manifest import ManifestEntry
from cots.data.noise import choose_noisy_pairs, write_noise_record


def _entries(n_images: int, captions_per_image: int) -> list[ManifestEntry]:
    return [
        ManifestEntry(Path(f"img{i}.png"), [f"image {i} caption {c}" for c in range(captions_per_image)])
        for i in range(n_images)
    ]


@pytest.mark.parametrize(
    "n_images,per_image,rate", [(50, 1, 0.2), (40, 5, 0.4), (7, 3, 0.5), (30, 2, 1.0), (100, 1, 0.011)]
)
def test_exact_fraction_from_other_images_and_a_permutation_of_the_captions(n_images, per_image, rate):
    pairs = ImageTextPairs(_entries(n_images, per_image), transform=lambda x: x, noise_rate=rate, noise_seed=3)
    original = ImageTextPairs(_entries(n_images, per_image), transform=lambda x: x)
    n = len(pairs)
    assert int(pairs.noisy.sum()) == round(rate * n)
    noisy = torch.nonzero(pairs.noisy).squeeze(1).tolist()
    for i in noisy:
        source = int(pairs.noise_source[i])
        image, caption = pairs.pairs[i]
        assert image == original.pairs[i][0] and caption == original.pairs[source][1]
        assert original.pairs[source][0] != image  # a caption of another image
    if len(noisy) > 1:  # a derangement within the noisy subset: the caption multiset is unchanged
        assert sorted(pairs.noise_source[noisy].tolist()) == sorted(noisy)
        assert sorted(pairs.captions()) == sorted(original.captions())
    clean = [i for i in range(n) if i not in set(noisy)]
    assert all(pairs.pairs[i] == original.pairs[i] for i in clean) and (pairs.noise_source[clean] == -1).all()


def test_seeded_choice_and_edge_cases():
    images = [i // 3 for i in range(300)]
    a, b = choose_noisy_pairs(images, 0.2, seed=1), choose_noisy_pairs(images, 0.2, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a >= 0, choose_noisy_pairs(images, 0.2, seed=2) >= 0)
    assert (choose_noisy_pairs(images, 0.0, seed=1) == -1).all()
    single = choose_noisy_pairs(images, 1 / 300, seed=1)  # one noisy pair: no derangement, borrow a caption
    (i,) = torch.nonzero(single >= 0).squeeze(1).tolist()
    assert images[int(single[i])] != images[i]
    with pytest.raises(ValueError, match="data.noise_rate"):
        choose_noisy_pairs(images, 1.5, seed=1)


def test_batches_carry_is_noisy_and_the_record_lists_the_pairs(tmp_path):
    pairs = ImageTextPairs(_entries(20, 2), transform=lambda x: x, noise_rate=0.25, noise_seed=0)
    items = [{"caption": pairs.pairs[i][1], "index": i, "noisy": bool(pairs.noisy[i])} for i in range(8)]
    batch = Collate(lambda captions: (torch.zeros(len(captions), 4, dtype=torch.long),) * 2)(items)
    assert batch["is_noisy"].dtype == torch.bool and torch.equal(batch["is_noisy"], pairs.noisy[:8])
    record = json.loads(write_noise_record(tmp_path / "noisy.json", pairs.noise_source, 0.25, 0).read_text())
    assert record["num_noisy"] == 10
    assert record["noisy"] == [[i, int(pairs.noise_source[i])] for i in range(40) if pairs.noisy[i]]


def test_datamodule_passes_the_rate_to_the_training_pairs(make_cfg):
    from hydra.utils import instantiate

    datamodule = instantiate(make_cfg("data.noise_rate=0.25", "data.noise_seed=5").data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    noisy = datamodule.train_set.noisy
    assert int(noisy.sum()) == round(0.25 * len(noisy))
    assert torch.equal(batch["is_noisy"], noisy[batch["index"]])
