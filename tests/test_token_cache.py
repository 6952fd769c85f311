"""Token cache (METHOD §4): build with the CLI, read aligned with the crop, equal to online tokens, mismatches named."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from cots.data.crops import center_box, crop_view, image_to_uint8, normalize_imagenet
from cots.data.images import load_rgb
from cots.data.manifest import load_manifest
from cots.data.synthetic import ensure_synthetic_dataset
from cots.data.text_tokenizer import TextTokenizer, train_wordpiece
from cots.data.token_cache import TokenCache, TokenCacheError
from cots.data.token_datasets import ImageTextTokenPairs, MVLMCollate, build_token_pairs
from cots.masking import IGNORE_INDEX, TextMasker
from cots.prepare.dvae_cli import main as cli_main
from cots_dvae import DalleTokenizer
from cots_dvae.weights import DVAEWeights, save_weights

TINY = dict(n_hid=16, n_blk_per_group=1, vocab_size=64)
VIT_SIZE, PATCH, DVAE_SIZE, GRID = 64, 16, 32, 4  # 64 / 16 = 4 patches per side = 32 / 8 tokens


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: threads only add overhead


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A 10-image synthetic manifest, a tiny random dVAE saved to disk, and a cache with 2 crops built by the CLI."""
    root = tmp_path_factory.mktemp("token_cache")
    data = ensure_synthetic_dataset(root / "data", num_train=10, num_val=1, num_test=1, image_size=40)
    torch.manual_seed(0)
    dvae = DalleTokenizer(input_size=DVAE_SIZE, **TINY)
    with torch.no_grad():
        # A random encoder sees mostly the mean brightness and gives one token everywhere: zero-mean
        # input filters make it respond to edges and colours, a larger output layer widens top-2 gaps.
        dvae.encoder.blocks.input.w.sub_(dvae.encoder.blocks.input.w.mean(dim=(1, 2, 3), keepdim=True))
        dvae.encoder.blocks.output.conv.w.mul_(10)
    weights = save_weights(
        root / "dvae.safetensors", DVAEWeights(encoder=dvae.encoder.state_dict(), arch=dvae.arch, input_size=DVAE_SIZE)
    )
    out = root / "cache" / "train_tokens.npy"
    manifest = data / "train.json"
    args = [
        "cache",
        "--manifest",
        str(manifest),
        "--weights",
        str(weights),
        "--image-size",
        str(VIT_SIZE),
        "--patch-size",
        str(PATCH),
        "--out",
        str(out),
        "--crops",
        "2",
        "--crop-scale",
        "0.3",
        "0.8",
        "--seed",
        "7",
        "--batch-size",
        "4",
    ]
    assert cli_main(args) == 0
    return {"root": root, "manifest": manifest, "weights": weights, "out": out, "dvae": DalleTokenizer(weights)}


def test_cache_round_trip_equals_online_tokens(setup):
    cache = TokenCache(
        setup["out"],
        manifest=setup["manifest"],
        weights=setup["weights"],
        num_images=10,
        grid=GRID,
        vocab_size=64,
        dvae_input_size=DVAE_SIZE,
    )
    assert (len(cache), cache.variants, cache.crops, cache.grid) == (10, 3, 2, (GRID, GRID))
    assert cache.tokens.dtype == np.uint16
    meta = json.loads(setup["out"].with_suffix(".json").read_text())
    assert meta["crops"] == {"count": 2, "scale": [0.3, 0.8], "ratio": [0.75, 4 / 3], "seed": 7}
    assert meta["image_size"] == VIT_SIZE and meta["dvae_sha1"] and meta["manifest_sha1"]

    entries = load_manifest(setup["manifest"])
    dvae = setup["dvae"]
    for index, entry in enumerate(entries):
        image = image_to_uint8(load_rgb(entry.image))
        assert cache.box(index, 0) == center_box(*image.shape[-2:])
        views = torch.stack([crop_view(image, cache.box(index, v), DVAE_SIZE) for v in range(3)])
        online = dvae.tokenize(views)  # 3 x h x w, one image at a time (the cache used batches of 4)
        cached = torch.stack([cache[index, v] for v in range(3)])
        assert cached.dtype == torch.long and torch.equal(cached, online), index
        assert torch.equal(cache[index], cache[index, 0])
    assert len(np.unique(cache.tokens)) >= 5  # the comparison is not between constant grids
    boxes = {cache.box(i, v) for i in range(10) for v in (1, 2)}
    assert len(boxes) == 20  # seeded random crops differ between images and variants
    with pytest.raises(IndexError, match="centre \\+ 2 crops"):
        cache[0, 3]
    clone = pickle.loads(pickle.dumps(cache))  # DataLoader workers reopen the memory map
    assert torch.equal(clone[3, 1], cache[3, 1])


def test_datasets_serve_tokens_aligned_with_the_crop(setup):
    entries = load_manifest(setup["manifest"])
    cache = TokenCache(setup["out"], manifest=setup["manifest"])
    cached = ImageTextTokenPairs(entries, VIT_SIZE, token_cache=cache, cache_crop="any", seed=3)
    online = ImageTextTokenPairs(entries, VIT_SIZE, DVAE_SIZE, scale=None, seed=3)  # centre crop, tokenized in the step
    dvae = setup["dvae"]
    variants = set()
    for pair_index in range(0, len(cached), 3):
        item = cached[pair_index, 1]
        entry_index = cached.pairs[pair_index][0]
        # Which variant was served: the one whose tokens and box reproduce the item.
        image = image_to_uint8(load_rgb(entries[entry_index].image))
        matches = [
            v
            for v in range(3)
            if torch.equal(item["image"], normalize_imagenet(crop_view(image, cache.box(entry_index, v), VIT_SIZE)))
        ]
        assert len(matches) == 1
        variants.add(matches[0])
        assert torch.equal(item["image_tokens"], cache[entry_index, matches[0]])
        assert item["image"].shape == (3, VIT_SIZE, VIT_SIZE)

        # Online, centre crop: the dVAE view tokenizes to the cached centre-crop tokens.
        live = online[pair_index, 1]
        dvae_view = live["image_dvae"]
        assert dvae_view.shape == (3, DVAE_SIZE, DVAE_SIZE) and 0 <= dvae_view.min() <= dvae_view.max() <= 1
        assert torch.equal(dvae.tokenize(live["image_dvae"][None])[0], cache[entry_index, 0])
    assert len(variants) > 1
    # Same (seed, epoch, index): same item; other epochs draw other cached variants.
    assert torch.equal(cached[5, 2]["image"], cached[5, 2]["image"])
    assert len({tuple(cached[5, epoch]["image_tokens"].flatten().tolist()) for epoch in range(6)}) > 1


def test_collate_and_factory(setup):
    entries = load_manifest(setup["manifest"])
    captions = [c for e in entries for c in e.captions]
    text = TextTokenizer(train_wordpiece(captions, vocab_size=80), max_length=24)
    image_tokens = {
        "source": "cache",
        "cache": str(setup["out"]),
        "weights": str(setup["weights"]),
        "dvae_input_size": DVAE_SIZE,
        "vocab_size": 64,
        "cache_crop": "random",
        "block_mask": {"mask_ratio": 0.4, "min_num_patches": 4},
    }
    pairs = build_token_pairs(
        entries, VIT_SIZE, 0, image_tokens, {"scale": [0.5, 1.0], "hflip": 0.0}, str(setup["manifest"])
    )
    collate = MVLMCollate(text, TextMasker.from_tokenizer(text))
    batch = collate([pairs[(i, 0)] for i in range(6)])
    assert batch["images"].shape == (6, 3, VIT_SIZE, VIT_SIZE)
    assert batch["image_tokens"].shape == (6, GRID, GRID) and batch["image_tokens"].dtype == torch.long
    assert batch["patch_mask"].shape == (6, GRID * GRID) and batch["patch_mask"].dtype == torch.bool
    assert batch["patch_mask"].sum(dim=1).min() >= 4
    assert batch["mlm_input_ids"].shape == batch["input_ids"].shape == batch["mlm_labels"].shape
    assert ((batch["mlm_labels"] != IGNORE_INDEX).sum(dim=1) >= 1).all()
    again = collate([pairs[(i, 0)] for i in range(6)])
    assert torch.equal(again["mlm_input_ids"], batch["mlm_input_ids"]) and torch.equal(
        again["patch_mask"], batch["patch_mask"]
    )

    online = build_token_pairs(
        entries, VIT_SIZE, 0, {"source": "online", "dvae_input_size": DVAE_SIZE, "block_mask": None}
    )
    batch = MVLMCollate(text)([online[i] for i in range(4)])
    assert (
        batch["images_dvae"].shape == (4, 3, DVAE_SIZE, DVAE_SIZE)
        and "patch_mask" not in batch
        and "mlm_labels" not in batch
    )
    with pytest.raises(ValueError, match="hflip"):
        build_token_pairs(entries, VIT_SIZE, 0, image_tokens, {"hflip": 0.5})


def test_mismatches_are_named(setup, tmp_path):
    out, manifest = setup["out"], setup["manifest"]
    edited = tmp_path / "train.json"
    data = json.loads(manifest.read_text())
    edited.write_text(json.dumps(data[:-1]))
    with pytest.raises(TokenCacheError, match=rf"{out}.*does not match {edited}: the manifest sha1"):
        TokenCache(out, manifest=edited)
    other_weights = save_weights(
        tmp_path / "other.safetensors",
        DVAEWeights(encoder=DalleTokenizer(input_size=DVAE_SIZE, **TINY).encoder.state_dict(), arch=setup["dvae"].arch),
    )
    with pytest.raises(TokenCacheError, match=rf"does not match {other_weights}: the dVAE weights sha1"):
        TokenCache(out, weights=other_weights)
    with pytest.raises(TokenCacheError, match=r"the token grid is \(4, 4\) in the cache but \(24, 24\) now"):
        TokenCache(out, grid=24)
    with pytest.raises(TokenCacheError, match="the dVAE vocabulary is 64 in the cache but 8192 now"):
        TokenCache(out, vocab_size=8192)
    with pytest.raises(FileNotFoundError, match="cots-dvae cache"):
        TokenCache(tmp_path / "missing.npy")
    # An interrupted build (no sidecar) is not a cache.
    partial = tmp_path / "partial.npy"
    shutil.copy(out, partial)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        TokenCache(partial)


def test_cli_rejects_a_grid_mismatch(setup, tmp_path, capsys):
    args = [
        "cache",
        "--manifest",
        str(setup["manifest"]),
        "--weights",
        str(setup["weights"]),
        "--image-size",
        "64",
        "--patch-size",
        "8",
        "--dvae-size",
        str(DVAE_SIZE),
        "--out",
        str(tmp_path / "t.npy"),
    ]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "--image-size / --patch-size = 64 / 8 = 8" in err and "--dvae-size=64" in err
    assert not (tmp_path / "t.npy").exists()
