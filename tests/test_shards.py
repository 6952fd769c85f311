"""WebDataset shards: conversion, exact epochs over ranks x workers, resampling, resume, bad samples."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from cots.data.datasets import ImageTextPairs
from cots.data.images import build_train_transform
from cots.data.manifest import load_manifest
from cots.data.shards import INDEX_NAME, ShardError, ShardLoader, ShardPairs, load_shard_index, read_shard
from cots.data.synthetic import ensure_synthetic_dataset
from cots.data.token_datasets import build_online_views, build_token_pairs
from cots.prepare.cli import main
from cots.prepare.manifest_writer import write_manifest
from cots.prepare.shard_writer import write_shards

TRANSFORM = build_train_transform(16)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """24 training images of 16 px, 3 captions each: 72 pairs."""
    return ensure_synthetic_dataset(
        tmp_path_factory.mktemp("shards") / "syn", num_train=24, num_val=2, num_test=2, image_size=16
    )


@pytest.fixture(scope="module")
def shard_dir(synthetic: Path) -> Path:
    out = synthetic.parent / "shards"
    write_shards(synthetic / "train.json", out, shard_size=7)
    return out


def _indices(items: list[dict]) -> list[int]:
    return [item["index"] for item in items]


def _epoch(
    shard_dir: Path, world: int, workers: int, epoch: int = 0, batch_size: int = 1, **kwargs
) -> list[list[list[int]]]:
    """Per rank, the batches (lists of pair indices) of one epoch, each rank with its own DataLoader."""
    ranks = []
    for rank in range(world):
        pairs = ShardPairs(shard_dir, TRANSFORM, rank, world, seed=0, batch_size=batch_size, shuffle_buffer=4, **kwargs)
        pairs.set_epoch(epoch)
        loader = DataLoader(pairs, batch_size=batch_size, num_workers=workers, collate_fn=_indices)
        ranks.append(list(loader))
        assert len(ranks[-1]) == len(loader)
    return ranks


def _flat(batches: list[list[int]]) -> list[int]:
    return [i for batch in batches for i in batch]


def test_conversion_writes_pairs_with_original_bytes(synthetic: Path, shard_dir: Path) -> None:
    index = load_shard_index(shard_dir)
    assert index.counts == (7,) * 10 + (2,)
    assert index.info["num_samples"] == index.info["num_manifest_pairs"] == 72
    entries = load_manifest(synthetic / "train.json")
    keys = []
    for path in index.paths:
        for sample in read_shard(path):
            meta = json.loads(sample["json"])
            entry = entries[meta["image_index"]]
            assert sample["__key__"] == f"{meta['pair_index']:010d}"
            assert sample["png"] == entry.image.read_bytes()
            assert sample["txt"].decode() == entry.captions[meta["caption_index"]]
            keys.append(meta["pair_index"])
    assert sorted(keys) == list(range(72))
    assert keys != sorted(keys)  # written in a seeded order, not manifest order
    # Read from the middle: skipped members are passed over, the rest come in file order.
    assert [s["__key__"] for s in read_shard(index.paths[0], 2, 3)] == [
        s["__key__"] for s in read_shard(index.paths[0])
    ][2:5]


def test_epoch_over_2_ranks_x_2_workers_sees_every_pair_once(shard_dir: Path) -> None:
    first = _epoch(shard_dir, world=2, workers=2, epoch=0)
    assert [len(_flat(rank)) for rank in first] == [36, 36]
    assert sorted(_flat(first[0]) + _flat(first[1])) == list(range(72))
    second = _epoch(shard_dir, world=2, workers=2, epoch=1)
    assert sorted(_flat(second[0]) + _flat(second[1])) == list(range(72))
    assert _flat(second[0]) + _flat(second[1]) != _flat(first[0]) + _flat(first[1])
    assert _epoch(shard_dir, world=2, workers=2, epoch=0) == first  # seeded


def test_ranks_get_equal_whole_batches(shard_dir: Path) -> None:
    # 72 pairs, 2 ranks x batch 5: 7 batches per rank, 2 pairs left over; 3 workers share 7 batches.
    ranks = _epoch(shard_dir, world=2, workers=3, batch_size=5)
    assert [len(batches) for batches in ranks] == [7, 7]
    assert all(len(batch) == 5 for batches in ranks for batch in batches)
    seen = _flat(ranks[0]) + _flat(ranks[1])
    assert len(set(seen)) == len(seen) == 70


def test_conversion_is_deterministic(synthetic: Path, shard_dir: Path, tmp_path: Path) -> None:
    write_shards(synthetic / "train.json", tmp_path / "again", shard_size=7, workers=2)
    names = sorted(p.name for p in shard_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (shard_dir / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_max_shard_bytes(synthetic: Path, tmp_path: Path) -> None:
    index = write_shards(synthetic / "train.json", tmp_path / "small", shard_size=1000, max_shard_bytes=20480)
    assert len(index["shards"]) > 1
    assert all(s["bytes"] <= 20480 for s in index["shards"])
    assert index["num_samples"] == 72


def test_unusable_images_are_skipped_and_counted(synthetic: Path, tmp_path: Path) -> None:
    good = json.loads((synthetic / "train.json").read_text())[:2]
    data = (synthetic / good[0]["image"]).read_bytes()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    entries = [
        {"image": str(synthetic / good[0]["image"]), "caption": ["a", "  ", "b"]},  # pairs 0, 1
        {"image": "missing.png", "caption": "c"},  # pair 2
        {"image": "empty.png", "caption": ["d", "e"]},  # pairs 3, 4
        {"image": "truncated.png", "caption": "f"},  # pair 5
        {"image": "text.jpg", "caption": "g"},  # pair 6
        {"image": str(synthetic / good[1]["image"]), "caption": ["", "h"]},  # pair 7
        {"image": str(synthetic / good[0]["image"]), "caption": ""},
    ]
    write_manifest(tmp_path / "bad.json", entries)
    index = write_shards(tmp_path / "bad.json", tmp_path / "out", shard_size=2, shuffle_seed=None)
    assert index["skipped_images"] == {"missing_file": 1, "undecodable": 3}  # the last entry merges into the first
    assert index["skipped_pairs"] == {"empty_caption": 3, "missing_file": 1, "undecodable": 4}
    assert index["num_samples"] == 3 and index["num_manifest_pairs"] == 8
    keys = [int(s["__key__"]) for p in load_shard_index(tmp_path / "out").paths for s in read_shard(p)]
    assert keys == [0, 1, 7]  # numbered as ImageTextPairs numbers them; manifest order kept


def test_resampled_draws_from_all_shards_and_is_seeded(shard_dir: Path) -> None:
    shard_of = {int(s["__key__"]): i for i, p in enumerate(load_shard_index(shard_dir).paths) for s in read_shard(p)}
    first = _flat(_epoch(shard_dir, world=1, workers=2, resampled=True, samples_per_epoch=720)[0])
    assert len(first) == 720
    assert {shard_of[i] for i in first} == set(range(11))
    again = _flat(_epoch(shard_dir, world=1, workers=2, resampled=True, samples_per_epoch=60)[0])
    assert again == _flat(_epoch(shard_dir, world=1, workers=2, resampled=True, samples_per_epoch=60)[0])
    assert again != _flat(_epoch(shard_dir, world=1, workers=2, epoch=1, resampled=True, samples_per_epoch=60)[0])


@pytest.mark.parametrize("workers, done", [(2, 5), (3, 4)])
def test_resume_mid_epoch_continues_the_same_stream(shard_dir: Path, workers: int, done: int) -> None:
    full = _epoch(shard_dir, world=2, workers=workers, epoch=1, batch_size=3)[1]
    pairs = ShardPairs(shard_dir, TRANSFORM, rank=1, world_size=2, seed=0, batch_size=3, shuffle_buffer=4)
    pairs.resume_from(epoch=1, consumed=done * 3)
    rest = list(DataLoader(pairs, batch_size=3, num_workers=workers, collate_fn=_indices))
    assert rest == full[done:]


def test_crops_and_captions_match_the_map_style_dataset(synthetic: Path, shard_dir: Path) -> None:
    pairs = ImageTextPairs(load_manifest(synthetic / "train.json"), TRANSFORM, seed=0)
    stream = ShardPairs(shard_dir, TRANSFORM, seed=0, shuffle_buffer=4)
    stream.set_epoch(3)
    assert stream.captions() == pairs.captions()
    for item in itertools.islice(stream, 5):
        expected = pairs[(item["index"], 3)]
        assert item["caption"] == expected["caption"]
        assert torch.equal(item["image"], expected["image"])


def test_token_level_views_match_the_manifest_path(synthetic: Path, shard_dir: Path) -> None:
    """With the token level on (online dVAE targets), a shard sample gives the manifest path's item for the same
    pair and epoch: the same ViT crop, dVAE view, flip, patch mask and caption-mask seed."""
    tokens = {"source": "online", "dvae_input_size": 16, "block_mask": {"mask_ratio": 0.4, "min_num_patches": 1}}
    transform = {"scale": (0.3, 1.0), "hflip": 0.5}
    pairs = build_token_pairs(load_manifest(synthetic / "train.json"), 16, 0, tokens, transform)
    stream = ShardPairs(shard_dir, TRANSFORM, seed=0, shuffle_buffer=4, views=build_online_views(16, tokens, transform))
    stream.set_epoch(3)
    items = list(itertools.islice(stream, 8))
    for item in items:
        expected = pairs[(item["index"], 3)]
        assert item["caption"] == expected["caption"] and item["mask_seed"] == expected["mask_seed"]
        for key in ("image", "image_dvae", "patch_mask"):
            assert torch.equal(item[key], expected[key]), key
    assert len({item["mask_seed"] for item in items}) == len(items)
    assert any(not torch.equal(a["patch_mask"], b["patch_mask"]) for a, b in itertools.pairwise(items))
    with pytest.raises(ValueError, match="source must be online with data.train_shards"):
        build_online_views(16, {**tokens, "source": "cache"}, transform)


def test_loader_hands_the_epoch_to_persistent_workers(shard_dir: Path) -> None:
    epoch = [0]
    pairs = ShardPairs(shard_dir, TRANSFORM, rank=0, world_size=2, seed=0, shuffle_buffer=4)
    loader = ShardLoader(
        pairs, batch_size=1, num_workers=2, persistent_workers=True, collate_fn=_indices, epoch=lambda: epoch[0]
    )
    assert list(loader) == _epoch(shard_dir, world=2, workers=2, epoch=0)[0]
    epoch[0] = 1
    assert list(loader) == _epoch(shard_dir, world=2, workers=2, epoch=1)[0]


def test_undecodable_sample_in_a_shard_is_replaced_and_counted(shard_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(shard_dir, broken)
    path = broken / "shard-000003.tar"
    with tarfile.open(path) as tar:  # same sizes, garbage bytes: the index still matches
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, (member, data) in enumerate(members):
            tar.addfile(member, io.BytesIO(b"\0" * len(data) if i == 0 else data))
    bad_key = int(members[0][0].name.split(".")[0])
    pairs = ShardPairs(broken, TRANSFORM, seed=0, shuffle_buffer=4)
    items = list(DataLoader(pairs, batch_size=None, num_workers=0))
    indices = [item["index"] for item in items]
    assert len(items) == 72 and bad_key not in indices and len(set(indices)) == 71
    assert Counter(r for item in items for r in item["skipped"]) == {"undecodable": 1}


def test_unfinished_or_too_small_shard_folders_are_refused(shard_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match="fewer than one global batch"):
        ShardPairs(shard_dir, TRANSFORM, world_size=8, batch_size=10)
    shutil.copytree(shard_dir, tmp_path / "partial")
    (tmp_path / "partial" / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match="did not finish"):
        ShardPairs(tmp_path / "partial", TRANSFORM)


def test_webdataset_reads_the_shards(shard_dir: Path) -> None:
    import webdataset as wds  # the test extra installs it: a missing package fails this test, it never skips

    samples = list(wds.WebDataset([str(p) for p in load_shard_index(shard_dir).paths], shardshuffle=False))
    assert len(samples) == 72
    assert {"__key__", "png", "txt", "json"} <= set(samples[0])


def test_cli(synthetic: Path, tmp_path: Path, capsys) -> None:
    argv = ["shards", "--manifest", str(synthetic / "train.json"), "--out", str(tmp_path / "cli"), "--shard-size", "7"]
    assert main(argv) == 0
    assert "wrote 72 pairs of 24 images to 11 shards" in capsys.readouterr().out
    assert load_shard_index(tmp_path / "cli").num_samples == 72
    assert main(["shards", "--manifest", str(tmp_path / "none.json"), "--out", str(tmp_path / "x")]) == 1
    assert "manifest file not found" in capsys.readouterr().err


def test_training_streams_from_shards_and_resumes_exactly(make_cfg, tmp_path, data_dir):
    """data.train_shards replaces the training manifest; a mid-epoch checkpoint resumes the same stream."""
    from cots.prepare.shard_writer import write_shards
    from cots.train import train

    train(
        make_cfg(
            "trainer.max_steps=1",
            "trainer.limit_val_batches=0",
            "trainer.check_val_every_n_epoch=null",
            "data.synthetic.num_train=64",
        )
    )  # builds the synthetic set
    shards = tmp_path / "shards"
    write_shards(data_dir / "synthetic-64-64" / "train.json", shards, shard_size=20)
    common = (
        "data.synthetic.num_train=64",
        f"data.train_shards={shards}",
        "trainer.limit_val_batches=0",
        "trainer.check_val_every_n_epoch=null",
        "trainer.max_epochs=-1",
        "trainer.deterministic=true",
    )
    _, full = train(make_cfg(*common, "trainer.max_steps=16"))
    assert full["trainer"].num_training_batches == 192 // 16  # 64 images x 3 captions, batch 16
    saving = (
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='s{step}'",
    )
    train(make_cfg(*common, *saving, "trainer.max_steps=6"))
    _, resumed = train(make_cfg(*common, "trainer.max_steps=16", f"ckpt_path={tmp_path / 'run/checkpoints/s5.ckpt'}"))
    expected, got = full["module"].model.state_dict(), resumed["module"].model.state_dict()
    worst = max((expected[k].float() - got[k].float()).abs().max().item() for k in expected)
    assert worst < 1e-5, worst


def test_a_token_cache_is_refused_with_shards_by_name(make_cfg, shard_dir):
    """A token cache is indexed by manifest rows: with shards the run stops before training and says so."""
    from omegaconf import open_dict

    from cots.config_checks import ConfigError
    from cots.train import train

    cfg = make_cfg("objective=mvlm", f"data.train_shards={shard_dir}")
    with open_dict(cfg):
        cfg.data.image_tokens = {
            "source": "cache",
            "cache": "/nonexistent/tokens.npy",
            "dvae_input_size": 32,
            "vocab_size": 64,
            "block_mask": {"mask_ratio": 0.4, "min_num_patches": 2},
        }
        cfg.data.text_mask = {"mask_prob": 0.15, "replace_prob": 0.8, "random_prob": 0.1}
    with pytest.raises(
        ConfigError, match=r"data.image_tokens.source: a token cache is indexed by the rows of a manifest"
    ):
        train(cfg)
