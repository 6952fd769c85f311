"""Shards written by img2dataset itself, read in place: sources, the index, exact epochs, bad samples, HTTP.

The ``i2d`` fixture runs img2dataset (the PyPI package, as users run it) against a local HTTP server on
127.0.0.1 that serves images made here: some truncated, some not images at all, some not there (404),
some with empty captions; then one of its shards is truncated by hand.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader
from webdata_helpers import (
    KEEP_IN_CUT_SHARD,
    NOT_SERVED,
    PER_SHARD,
    http_server,
    img2dataset_folder,
    jpeg_bytes,
    shard_pairs_to_manifest,
    usable,
)

from cots.data.datasets import ImageTextPairs
from cots.data.images import BadSample, build_train_transform
from cots.data.manifest import load_manifest
from cots.data.sampler import ShardedEpochSampler
from cots.data.shard_index import INDEX_NAME, ShardError
from cots.data.shard_set import build_shard_set
from cots.data.shard_stream import EpochStream
from cots.data.shards import ShardPairs, shard_captions
from cots.data.sources import SourceError, expand_braces, parse_sources
from cots.data.tar_reader import read_shard
from cots.prepare.cli import main as cots_data
from cots.prepare.shard_indexer import index_shards

TRANSFORM = build_train_transform(16)


@pytest.fixture(scope="session")
def i2d(tmp_path_factory) -> Path:
    return img2dataset_folder(tmp_path_factory)


def _items(pairs: ShardPairs, workers: int = 0) -> list[dict]:
    return list(DataLoader(pairs, batch_size=None, num_workers=workers))


def test_brace_lists_globs_folders_and_weights(tmp_path: Path) -> None:
    assert expand_braces("/d/{00000..00002}.tar") == ["/d/00000.tar", "/d/00001.tar", "/d/00002.tar"]
    assert expand_braces("/d/{cc3m,sbu}/{8..10}.tar") == [
        f"/d/{s}/{i}.tar" for s in ("cc3m", "sbu") for i in (8, 9, 10)
    ]
    assert expand_braces("s3://b/{0..1}.tar") == ["s3://b/0.tar", "s3://b/1.tar"]
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(3):
            (tmp_path / name / f"{i:05d}.tar").write_bytes(b"")
    a, b = tmp_path / "a", tmp_path / "b"
    sources = parse_sources(
        [str(a), {"shards": f"{b}/{{00000..00001}}.tar", "weight": 2, "name": "sbu", "caption": "json:caption"}],
        {"image": ["png"]},
    )
    assert [s.name for s in sources] == ["a", "sbu"]
    assert sources[0].urls == tuple(str(a / f"{i:05d}.tar") for i in range(3))
    assert sources[1].urls == (str(b / "00000.tar"), str(b / "00001.tar")) and sources[1].weight == 2
    assert sources[0].members.image == ("png",) and sources[1].members.caption_json_field == "caption"
    assert parse_sources(f"{a}/*.tar::{b}/00002.tar")[0].urls[-1] == str(b / "00002.tar")
    with pytest.raises(SourceError, match="no .tar shards"):
        parse_sources(str(tmp_path / "nothing" / "*.tar"))
    with pytest.raises(SourceError, match="in two sources"):
        parse_sources([str(a), f"{a}/00000.tar"])
    with pytest.raises(SourceError, match="weight must be > 0"):
        parse_sources([{"shards": str(a), "weight": 0}])


def test_index_counts_img2dataset_output_and_the_cut_shard(i2d: Path) -> None:
    index = json.loads((i2d / INDEX_NAME).read_text())["shards"]
    stats = {p.name.replace("_stats.json", ".tar"): json.loads(p.read_text()) for p in i2d.glob("*_stats.json")}
    for name in (f"{i:05d}.tar" for i in range(4)):
        assert index[name]["samples"] == stats[name]["successes"] == PER_SHARD - 1, name  # the 404 is not there
        assert index[name]["members"] == {"jpg": 15, "json": 15, "txt": 15}
        assert not index[name]["truncated"]
        assert index[name]["img2dataset"]["failed_to_download"] == 1
    cut = index["00004.tar"]
    assert cut["truncated"] and cut["incomplete"] == 1 and cut["samples"] == KEEP_IN_CUT_SHARD
    assert cut["bytes"] == (i2d / "00004.tar").stat().st_size
    with tarfile.open(i2d / "00001.tar") as tar:  # offsets point at sample headers
        assert cut["offsets"] == [0] and tar.getmembers()[0].offset == 0


def _epoch_items(i2d: Path, world: int, batch_size: int, epoch: int = 0, workers: int = 2) -> list[list[dict]]:
    ranks = []
    for rank in range(world):
        pairs = ShardPairs(i2d, TRANSFORM, rank, world, seed=0, batch_size=batch_size, shuffle_buffer=8)
        pairs.set_epoch(epoch)
        ranks.append(_items(pairs, workers))
    return ranks


@pytest.mark.parametrize("world", [1, 2])
def test_an_epoch_sees_the_same_pairs_as_the_manifest_of_the_same_pairs(i2d: Path, tmp_path: Path, world: int):
    """The comparison, defined: over one epoch, split over ``world`` ranks x 2 workers, the shard path
    yields every usable pair of the shards once (the set of (image bytes, caption) equals the set the
    manifest path yields over its epoch of the same pairs), and counts every bad sample exactly once
    by reason: the undecodable images (which the manifest path counts too, at least once each: a
    substitute it tries may be bad as well) and the empty captions (which the manifest path drops up
    front). The order differs (a seeded shard order and a buffer shuffle against a permutation);
    ``test_webdataset_training.py`` makes the orders equal and compares trained weights."""
    manifest = shard_pairs_to_manifest(i2d, tmp_path)
    entries = load_manifest(manifest)
    reasons = [usable(e.image, e.captions[0]) for e in entries]
    good = {(e.image.read_bytes(), e.captions[0]) for e, r in zip(entries, reasons, strict=True) if r is None}
    assert len(entries) == 4 * 15 + KEEP_IN_CUT_SHARD and len(good) >= 50
    expected = Counter(r for r in reasons if r)
    assert set(expected) == {"undecodable", "empty_caption"}

    ranks = _epoch_items(i2d, world, batch_size=1)
    assert len({len(r) for r in ranks}) == 1 and sum(len(r) for r in ranks) == len(entries)  # no tail: 66 = 2 x 33
    seen = {(entries[it["index"]].image.read_bytes(), it["caption"]) for rank in ranks for it in rank}
    assert seen == good
    assert Counter(reason for rank in ranks for it in rank for reason in it["skipped"]) == expected

    pairs = ImageTextPairs(entries, TRANSFORM, seed=0)
    assert pairs.dropped == {"empty_caption": expected["empty_caption"]}
    manifest_seen, manifest_skipped = set(), Counter()
    for rank in range(world):
        sampler = ShardedEpochSampler(len(pairs), rank, world, seed=0)
        assert len(pairs) % world == 0  # no tail here either
        for key in sampler:
            item = pairs[key]
            manifest_seen.add((entries[item["image_id"]].image.read_bytes(), item["caption"]))
            manifest_skipped.update(item["skipped"])
    assert manifest_seen == good
    # The manifest path tries substitutes at index + k * 7919, which may be bad too and are counted again.
    assert set(manifest_skipped) == {"undecodable"} and manifest_skipped["undecodable"] >= expected["undecodable"]


def test_captions_for_the_tokenizer_equal_the_manifest_paths(i2d: Path, tmp_path: Path) -> None:
    manifest = shard_pairs_to_manifest(i2d, tmp_path)
    assert shard_captions(i2d) == ImageTextPairs(load_manifest(manifest), TRANSFORM).captions()


@pytest.mark.parametrize("workers, done", [(2, 5), (3, 4)])
def test_resume_mid_epoch_continues_the_same_stream_with_two_sources(i2d: Path, workers: int, done: int) -> None:
    spec = [{"shards": f"{i2d}/{{00000..00002}}.tar"}, {"shards": f"{i2d}/{{00003..00004}}.tar", "weight": 1.5}]

    def run(resume: int | None) -> list[list[int]]:
        pairs = ShardPairs(spec, TRANSFORM, rank=1, world_size=2, seed=3, batch_size=3, shuffle_buffer=4)
        (pairs.set_epoch(2) if resume is None else pairs.resume_from(2, resume * 3))
        loader = DataLoader(pairs, batch_size=3, num_workers=workers, collate_fn=lambda b: [i["index"] for i in b])
        return list(loader)

    full = run(None)
    assert run(done) == full[done:]


def test_mixing_weights_make_an_exact_epoch(i2d: Path) -> None:
    """Source a (45 samples, weight 1) and b (21 samples, weight 1.5 -> 32): an epoch of 77 holds every
    sample of a once, every sample of b once and 11 of them twice, the repeats with other crops."""
    spec = [{"shards": f"{i2d}/{{00000..00002}}.tar"}, {"shards": f"{i2d}/{{00003..00004}}.tar", "weight": 1.5}]
    pairs = ShardPairs(spec, TRANSFORM, seed=0, shuffle_buffer=1)
    assert len(pairs) == 45 + 32
    stream = EpochStream(pairs.shard_set, 0, 0)
    raw = [(sample["__source__"], sample["__id__"], sample["__repeat__"]) for sample in stream.read(0, len(stream))]
    ids = Counter(r[1] for r in raw)
    assert sorted(i for i in ids if i < 45) == list(range(45)) and all(ids[i] == 1 for i in range(45))
    assert sorted(i for i in ids if i >= 45) == list(range(45, 66)) and sum(ids[i] == 2 for i in ids) == 11
    assert all(repeat == (ids[i] == 2 and repeat) for _, i, repeat in raw)  # only b's second pass is a repeat
    assert 0.2 < sum(source == 1 for source, _, _ in raw[:38]) / 38 < 0.65  # mixed all along (32/77 expected)
    samples = {}  # the two passes over a repeated sample decode to different crops
    for sample in EpochStream(pairs.shard_set, 0, 0).read(0, 77):
        samples.setdefault(sample["__id__"], []).append(sample)
    crops = []
    for twice in (twice for twice in samples.values() if len(twice) == 2 and twice[0]["txt"].strip()):
        try:  # some of img2dataset's images here are corrupt on purpose
            crops.append([pairs._decode(x, pairs._sample_key(x, 0, 0, 0))["image"] for x in twice])
        except BadSample:
            continue
    assert len(crops) >= 3 and all(not torch.equal(a, b) for a, b in crops)


def test_changed_or_unindexed_shards_are_refused_by_name(i2d: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(i2d, copy, copy_function=shutil.copy2)  # mtimes kept
    (copy / INDEX_NAME).unlink()
    with pytest.raises(ShardError, match="not indexed.*cots-data index-shards"):
        build_shard_set(str(copy))
    out = tmp_path / "elsewhere.json"
    summary = index_shards([str(copy)], out=str(out), workers=1, checksum=True, log=lambda _: None)
    assert summary["samples"] == 66 and summary["truncated"] == [str(copy / "00004.tar")]
    assert build_shard_set(str(copy), index_paths=str(out)).num_samples == 66
    with open(copy / "00002.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(ShardError, match="00002.tar: changed since it was indexed"):
        build_shard_set(str(copy), index_paths=str(out))
    with pytest.raises(ShardError, match="00002.tar"):
        index_shards([str(copy)], out=str(out), log=lambda _: None)
    os.utime(copy / "00001.tar", ns=(0, 0))  # a copy that lost its mtime: same sha1, kept
    again = index_shards([str(copy)], out=str(out), refresh=True, checksum=True, log=lambda _: None)
    assert again["scanned"] == 1 and again["kept"] == 4
    assert build_shard_set(str(copy), index_paths=str(out)).num_samples == 66


def test_missing_image_member_and_caption_in_a_json_field(tmp_path: Path) -> None:
    import webdataset as wds

    (tmp_path / "s").mkdir()
    with wds.TarWriter(str(tmp_path / "s" / "0.tar")) as sink:
        sink.write({"__key__": "a", "png": _png(), "json": json.dumps({"meta": {"caption": "red"}}).encode()})
        sink.write({"__key__": "b", "json": json.dumps({"meta": {"caption": "no image"}}).encode()})
        sink.write({"__key__": "c", "webp": b"RIFF....WEBP", "json": b'{"meta": {}}'})
        sink.write({"__key__": "d", "png": _png(), "json": json.dumps({"meta": {"caption": "blue"}}).encode()})
    assert cots_data(["index-shards", str(tmp_path / "s")]) == 0
    pairs = ShardPairs([{"shards": str(tmp_path / "s"), "caption": "json:meta.caption"}], TRANSFORM, shuffle_buffer=1)
    assert pairs.captions() == ["red", "no image", "blue"]
    items = _items(pairs)
    assert [it["caption"] for it in items] == ["red", "blue", "blue", "blue"]
    assert Counter(r for it in items for r in it["skipped"]) == {"missing_image": 1, "empty_caption": 1}


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def test_streams_from_http_with_range_reads(i2d: Path, tmp_path: Path) -> None:
    """Index and read the shards over HTTP from 127.0.0.1: a sample in the middle of a shard costs a
    range request of a few blocks, never the whole file; a shard changed on the server is refused."""
    big = tmp_path / "big"
    big.mkdir()
    import webdataset as wds

    with wds.TarWriter(str(big / "00000.tar")) as sink:
        for i in range(200):
            sink.write({"__key__": f"{i:05d}", "jpg": jpeg_bytes(i, 160, 120, 95), "txt": f"picture {i}".encode()})
    size = (big / "00000.tar").stat().st_size
    with http_server(big) as server:
        url = f"{server.url}/{{00000..00000}}.tar"
        out = tmp_path / "remote-index.json"
        assert cots_data(["index-shards", url, "--out", str(out), "--workers", "1"]) == 0
        record = json.loads(out.read_text())["shards"][f"{server.url}/00000.tar"]
        assert record["samples"] == 200 and record["etag"] and len(record["offsets"]) == 4
        shard = build_shard_set(url, index_paths=str(out)).shards[0]
        server.requests.clear()
        sample = next(read_shard(shard.url, 150, 1, shard.record, 64, block_size=1 << 14))
        assert sample["__key__"] == "00150" and sample["txt"] == b"picture 150"
        ranged = [r for r in server.requests if r[0] == "GET"]
        assert ranged and all(r[2] and r[2].startswith("bytes=") for r in ranged)
        assert sum(r[3] for r in ranged) < size / 4, (ranged, size)
        pairs = ShardPairs(build_shard_set(url, index_paths=str(out)), TRANSFORM, shuffle_buffer=1, batch_size=8)
        assert sorted(it["index"] for it in _items(pairs, workers=1)) == list(range(200))
        with open(big / "00000.tar", "ab") as f:
            f.write(b"\0" * 1024)
        with pytest.raises(ShardError, match="00000.tar: changed since it was indexed"):
            next(read_shard(shard.url, 0, 1, shard.record, 64))


def test_img2dataset_leaves_the_404s_out(i2d: Path) -> None:
    keys = [s["__key__"] for s in read_shard(str(i2d / "00000.tar"))]
    assert len(keys) == PER_SHARD - 1 and f"{NOT_SERVED:09d}" not in keys


def test_fast_decoders_give_pillows_pixels_and_fall_back_to_it() -> None:
    """simplejpeg and torchvision decode JPEGs bit-identically to Pillow (all libjpeg-turbo); what they refuse
    (a truncated file, a PNG) goes to Pillow, which decodes it or names the reason. DCT-reduced decoding
    applies only when the smallest crop stays at least the output size."""
    from torchvision.transforms.v2 import functional as F

    from cots.data.decode import Decoder, reduced_size
    from cots.data.images import BadSample

    data = jpeg_bytes(7, 300, 200)
    pillow = F.to_image(Decoder("pillow")(data))
    for name in ("simplejpeg", "torchvision"):
        fast = Decoder(name)(data)
        assert isinstance(fast, torch.Tensor) and torch.equal(fast, pillow.as_subclass(torch.Tensor)), name
        with pytest.raises(BadSample, match="undecodable"):
            Decoder(name)(data[: len(data) // 2])
        assert Decoder(name)(_png()).size == (20, 20)  # Pillow's PIL image
    assert reduced_size(1024, 768, 224, 0.5) == (512, 384) and reduced_size(512, 384, 224, 0.5) is None
    assert reduced_size(2048, 1536, 224, 0.5) == (512, 384)  # 1/4: the smallest crop, 1086 px, is still 271 px
    assert Decoder("simplejpeg", (16, 0.5))(jpeg_bytes(1, 320, 240)).shape == (3, 30, 40)  # 1/8 of 320 x 240
    assert Decoder("pillow", (16, 0.5))(jpeg_bytes(1, 320, 240)).size == (40, 30)
    with pytest.raises(ValueError, match="data.decoder"):
        Decoder("pil")
