"""Karpathy split files read as they are: splits, restval, captions per image, paths, errors naming the entry."""

from __future__ import annotations

import json

import pytest
from karpathy_fixture import COCO_COUNTS, write_karpathy

from cots.data.karpathy import KarpathyError, read_karpathy_splits
from cots.data.karpathy_datamodule import KarpathyDataModule


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    return root, write_karpathy(root, "coco")


def _module(path, root, **kwargs) -> KarpathyDataModule:
    return KarpathyDataModule(karpathy_json=str(path), dataset=kwargs.pop("dataset", "coco"), image_root=str(root),
                              num_workers=0, **kwargs)  # fmt: skip


def test_coco_splits_follow_the_file_with_restval_in_train(coco):
    root, path = coco
    splits = read_karpathy_splits(path, root, "coco")
    assert {k: len(v) for k, v in splits.items()} == {"train": 16 + 8, "val": 6, "test": 10}
    without = read_karpathy_splits(path, root, "coco", restval_in_train=False)
    assert len(without["train"]) == COCO_COUNTS["train"]
    # file order; the file's filepath / filename under image_root; every image exists
    images = json.loads(path.read_text())["images"]
    test_files = [root / item["filepath"] / item["filename"] for item in images if item["split"] == "test"]
    assert [entry.image for entry in splits["test"]] == test_files
    assert all(entry.image.is_file() for split in splits.values() for entry in split)
    assert splits["train"][16].image.parent.name == "val2014"  # restval images live in val2014


def test_galleries_keep_five_captions_training_keeps_all(coco, tmp_path):
    root, path = coco
    splits = read_karpathy_splits(path, root, "coco")
    assert all(len(entry.captions) == 5 for split in ("val", "test") for entry in splits[split])
    assert (
        read_karpathy_splits(path, root, "coco", captions_per_image=None)["test"][0].captions[-1].startswith("a sixth")
    )
    data = json.loads(path.read_text())
    first_train = next(i for i, item in enumerate(data["images"]) if item["split"] == "train")
    data["images"][first_train]["sentences"].append({"raw": "one more for training"})
    first_val = next(i for i, item in enumerate(data["images"]) if item["split"] == "val")
    data["images"][first_val]["sentences"] = data["images"][first_val]["sentences"][:4]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(data))
    with pytest.raises(KarpathyError, match=rf"images\[{first_val}\] \(COCO_val2014_.*\): a val image with 4"):
        read_karpathy_splits(short, root, "coco")
    train = read_karpathy_splits(short, root, "coco", captions_per_image=None)["train"]
    assert train[0].captions[-1] == "one more for training" and len(train[0].captions) == 6


def test_flickr_entries_have_no_filepath(tmp_path):
    path = write_karpathy(tmp_path, "flickr30k", {"train": 3, "val": 2, "test": 2})
    splits = read_karpathy_splits(path, tmp_path / "images", "flickr30k")
    assert [e.image for e in splits["test"]] == [tmp_path / "images" / "1005.jpg", tmp_path / "images" / "1006.jpg"]
    with pytest.raises(KarpathyError, match="holds dataset 'flickr30k', but data.dataset='coco'"):
        read_karpathy_splits(path, tmp_path / "images", "coco")
    # Flickr reports its 1K test alone: no fold table, whatever data.test_fold_size says
    flickr = _module(path, tmp_path / "images", dataset="flickr30k", test_fold_size=1)
    assert flickr.missing_files() == [] and flickr.evaluation_fold_size("test") is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"split": "dev"}, r"'split' must be one of train, restval, val, test, got \"dev\""),
        ({"filename": None}, r"images\[3\]: no 'filename'"),
        ({"filepath": 7}, r"'filepath' must be a string, got 7"),
        ({"sentences": []}, r"'sentences' must be a non-empty list"),
        (
            {"sentences": [{"raw": 5}]},
            r"images\[3\] \(COCO_train2014_000000000003.jpg\): sentences\[0\]: needs a 'raw'",
        ),
    ],
)
def test_a_broken_entry_is_named(coco, tmp_path, change, message):
    root, path = coco
    data = json.loads(path.read_text())
    data["images"][3].update(change)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(data))
    with pytest.raises(KarpathyError, match=message):
        read_karpathy_splits(broken, root, "coco")


def test_tokens_stand_in_for_a_missing_raw(coco, tmp_path):
    root, path = coco
    data = json.loads(path.read_text())
    del data["images"][0]["sentences"][0]["raw"]
    changed = tmp_path / "tokens.json"
    changed.write_text(json.dumps(data))
    first = read_karpathy_splits(changed, root, "coco")["train"][0]
    assert first.captions[0] == " ".join(data["images"][0]["sentences"][0]["tokens"])


def test_data_module_reads_splits_folds_and_checks_the_image_root(coco, tmp_path):
    root, path = coco
    module = _module(path, root, test_fold_size=2)
    assert module.missing_files() == []
    assert len(module.entries("test")) == 10 and len(module.gallery_captions("test")) == 50
    assert module.evaluation_fold_size("test") == 2 and module.evaluation_fold_size("val") is None
    assert _module(path, root, test_fold_size=4).evaluation_fold_size("test") is None  # 10 is not a multiple
    assert _module(path, root, dataset="coco", test_fold_size=None).evaluation_fold_size("test") is None
    # data.restval_in_train=false: COCO's restval images leave train, val and test stay
    without_restval = _module(path, root, restval_in_train=False)
    assert len(without_restval.entries("train")) == COCO_COUNTS["train"] and len(module.entries("train")) == 24
    assert len(without_restval.entries("test")) == 10
    problems = _module(path, tmp_path).missing_files()
    assert len(problems) == 3 and "data.image_root: the first train image" in problems[0]
    assert "train2014/ and val2014/" in problems[0]
    # another manifest for one split is read as a manifest
    manifest = tmp_path / "other.json"
    manifest.write_text(json.dumps([{"image": str(module.entries("test")[0].image), "caption": ["x", "y"]}]))
    other = _module(path, root, test_manifest=str(manifest))
    assert len(other.entries("test")) == 1 and len(other.entries("val")) == 6
    assert other.evaluation_fold_size("test") is None
