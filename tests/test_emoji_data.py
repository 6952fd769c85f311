"""Tests of ``cots-data emoji`` on a tiny fake package tree (offline, no npm), plus one slow real build."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from cots.data.manifest import load_manifest
from cots.prepare import emoji as emoji_build
from cots.prepare.cli import main
from cots.prepare.emoji import EmojiSources, build_dataset, find_complete_build
from cots.prepare.emoji_catalog import (
    EmojiDataError,
    emoji_string,
    load_catalog,
    load_cldr,
    split_of,
    train_captions,
)
from cots.prepare.npm_packages import NpmError, NpmPackage, fetch_package, sha512_integrity

FE0F = "\ufe0f"
VENDORS = ("google", "twitter")
# Fixture bases and the split the rule gives them (checked in test_fixture_covers_all_splits).
FIXTURE_SPLITS = {"1F44D": "test", "1F44B": "train", "2764-FE0F": "train", "1F431": "val", "E000": "train"}


def _entry(unified: str, skins: dict[str, dict] | None = None, **has_img: bool) -> dict:
    entry = {
        "unified": unified,
        "image": unified.lower() + ".png",
        "name": unified,
        "category": "Fake",
        "subcategory": "fake",
        **{f"has_img_{v}": has_img.get(v, True) for v in VENDORS},
    }
    if skins:
        entry["skin_variations"] = skins
    return entry


def _skin(unified: str, **has_img: bool) -> dict:
    return {
        "unified": unified,
        "image": unified.lower() + ".png",
        **{f"has_img_{v}": has_img.get(v, True) for v in VENDORS},
    }


def _png(path: Path, mode: str) -> None:
    """A 4x4 image: left half fully transparent, right half opaque red (grey for LA)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # like some twitter images: palette index 0 marked transparent
        im = Image.new("P", (4, 4), 0)
        im.putpalette([0, 0, 0, 200, 0, 0])
        im.paste(1, (2, 0, 4, 4))
        im.save(path, transparency=0)
        return
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    im.paste((200, 0, 0, 255), (2, 0, 4, 4))
    (im.convert("LA") if mode == "LA" else im).save(path)


def make_packages(root: Path) -> EmojiSources:
    """Fake extracted ``package/`` folders laid out like the npm packages."""
    emoji = [
        # Skin tones go with their base; the twitter image of 1F3FC is missing on purpose.
        _entry("1F44D", {"1F3FB": _skin("1F44D-1F3FB"), "1F3FC": _skin("1F44D-1F3FC", twitter=False)}),
        _entry("1F44B", {"1F3FB": _skin("1F44B-1F3FB")}),
        _entry("2764-FE0F"),  # CLDR key has no FE0F
        _entry("1F431"),  # CLDR key has an FE0F that emoji-datasource lacks
        _entry("E000"),  # no CLDR entry at all
    ]
    annotations = {
        "👍": {"default": ["+1", "hand", "thumb"], "tts": ["thumbs up"]},
        "👋": {"default": ["hand", "wave", "waving"], "tts": ["waving hand"]},
        "❤": {"default": ["heart", "red heart", "love"], "tts": ["red heart"]},
        "🐱" + FE0F: {"default": ["cat"], "tts": ["cat face"]},
    }
    derived = {
        "👍🏻": {"default": ["+1", "light skin tone"], "tts": ["thumbs up: light skin tone"]},
        "👍🏼": {"default": ["+1", "medium-light skin tone"], "tts": ["thumbs up: medium-light skin tone"]},
        "👋🏻": {"default": ["hand", "light skin tone"], "tts": ["waving hand: light skin tone"]},
    }
    ds = root / "emoji-datasource/package"
    ds.mkdir(parents=True)
    (ds / "emoji.json").write_text(json.dumps(emoji))
    ann = root / "cldr-annotations-full/package"
    (ann / "annotations/en").mkdir(parents=True)
    (ann / "annotations/en/annotations.json").write_text(
        json.dumps({"annotations": {"identity": {"language": "en"}, "annotations": annotations}})
    )
    der = root / "cldr-annotations-derived-full/package"
    (der / "annotationsDerived/en").mkdir(parents=True)
    (der / "annotationsDerived/en/annotations.json").write_text(
        json.dumps({"annotationsDerived": {"identity": {"language": "en"}, "annotations": derived}})
    )
    images = {}
    modes = ["RGBA", "P", "LA"]
    for vendor in VENDORS:
        images[vendor] = root / f"emoji-datasource-{vendor}/package"
        entries = [v for e in emoji for v in [e, *e.get("skin_variations", {}).values()]]
        for i, v in enumerate(entries):
            if v[f"has_img_{vendor}"]:
                _png(images[vendor] / f"img/{vendor}/64" / v["image"], modes[i % 3])
    return EmojiSources(ds, ann, der, images)


@pytest.fixture
def sources(tmp_path: Path) -> EmojiSources:
    return make_packages(tmp_path / "pkgs")


def _no_partial_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# --- split rule -------------------------------------------------------------------------------


def test_fixture_covers_all_splits() -> None:
    assert {b: split_of(b) for b in FIXTURE_SPLITS} == FIXTURE_SPLITS


def test_split_rule_matches_formula_and_ratio() -> None:
    bases = [f"{cp:X}" for cp in range(0x1F300, 0x1F300 + 3000)]
    splits = Counter()
    for base in bases:
        split = split_of(base)
        splits[split] += 1
        is_test = int(hashlib.sha1(base.encode()).hexdigest(), 16) % 100 < 20
        assert (split == "test") == is_test
        assert split_of(base.lower()) == split  # the group key is upper-cased
    assert 0.17 < splits["test"] / len(bases) < 0.23
    assert 0.07 < splits["val"] / (splits["val"] + splits["train"]) < 0.13


def test_built_splits_keep_groups_and_skin_tones_together(sources: EmojiSources, tmp_path: Path) -> None:
    out = tmp_path / "out"
    build_dataset(sources, out, VENDORS)
    split_of_image: dict[str, set[str]] = {}
    for name in ["train.json", *(f"{s}_{v}.json" for s in ("val", "test") for v in VENDORS)]:
        split = name.split("_")[0].removesuffix(".json")
        for entry in json.loads((out / name).read_text()):
            split_of_image.setdefault(Path(entry["image"]).stem.upper(), set()).add(split)
    assert all(len(s) == 1 for s in split_of_image.values())  # no image (hence no group) in two splits
    for stem, (split,) in split_of_image.items():
        base = stem.split("-1F3F")[0]  # strip a skin-tone modifier
        assert split == FIXTURE_SPLITS[base], stem


# --- join and captions ------------------------------------------------------------------------


def test_join_strips_fe0f_on_both_sides(sources: EmojiSources) -> None:
    cldr = load_cldr(
        sources.annotations / "annotations/en/annotations.json",
        sources.derived / "annotationsDerived/en/annotations.json",
    )
    assert emoji_string("2764-FE0F") == "❤" + FE0F
    items, skipped = load_catalog(sources.datasource / "emoji.json", cldr, VENDORS)
    names = {i.unified: i.name for i in items}
    assert names["2764-FE0F"] == "red heart"  # FE0F in emoji-datasource only
    assert names["1F431"] == "cat face"  # FE0F in CLDR only
    assert names["1F44D-1F3FC"] == "thumbs up: medium-light skin tone"  # derived annotations
    assert skipped == ["E000"]
    by_unified = {i.unified: i for i in items}
    assert by_unified["1F44D-1F3FC"].base == "1F44D"
    assert by_unified["1F44D-1F3FC"].vendors == {"google"}


def test_train_captions_are_deterministic_without_duplicates(sources: EmojiSources) -> None:
    cldr = load_cldr(
        sources.annotations / "annotations/en/annotations.json",
        sources.derived / "annotationsDerived/en/annotations.json",
    )
    items, _ = load_catalog(sources.datasource / "emoji.json", cldr, VENDORS)
    heart = next(i for i in items if i.unified == "2764-FE0F")
    assert train_captions(heart) == ["red heart", "heart, love"]
    cat = next(i for i in items if i.unified == "1F431")
    assert train_captions(cat) == ["cat face", "cat"]


# --- build output -----------------------------------------------------------------------------


def test_build_writes_manifests_and_rgb_images(sources: EmojiSources, tmp_path: Path) -> None:
    out = tmp_path / "out"
    info = build_dataset(sources, out, VENDORS)
    counts = info["counts"]
    assert counts["images"] == {
        "train": {"google": 3, "twitter": 3},
        "val": {"google": 1, "twitter": 1},
        "test": {"google": 3, "twitter": 2},
    }
    assert counts["skipped_no_caption"] == 1 and counts["skipped_no_image"] == {"google": 0, "twitter": 1}
    assert counts["train_name_pairs"] == 6

    train = json.loads((out / "train.json").read_text())
    assert len(train) == counts["train_pairs"]
    assert all(isinstance(e["caption"], str) for e in train)
    assert {"image": "images/google/2764-fe0f.png", "caption": "red heart"} in train
    assert {"image": "images/twitter/2764-fe0f.png", "caption": "heart, love"} in train
    assert sorted(c for e in train if e["image"] == "images/google/1f44b-1f3fb.png" for c in [e["caption"]]) == sorted(
        ["waving hand: light skin tone", "hand, light skin tone"]
    )

    # Names only, one pair per image: train concepts, then train + val concepts; never a test concept.
    train_names = json.loads((out / "train_names.json").read_text())
    assert len(train_names) == counts["train_name_pairs"] == 6
    assert {"image": "images/twitter/2764-fe0f.png", "caption": "red heart"} in train_names
    assert {e["image"] for e in train_names} == {e["image"] for e in train}
    trainval = json.loads((out / "trainval_names.json").read_text())
    assert trainval == train_names + [
        {"image": "images/google/1f431.png", "caption": "cat face"},
        {"image": "images/twitter/1f431.png", "caption": "cat face"},
    ]
    assert counts["trainval_name_pairs"] == 8

    test_twitter = json.loads((out / "test_twitter.json").read_text())
    assert test_twitter == [
        {"image": "images/twitter/1f44d.png", "caption": ["thumbs up"]},
        {"image": "images/twitter/1f44d-1f3fb.png", "caption": ["thumbs up: light skin tone"]},
    ]
    assert json.loads((out / "val_google.json").read_text()) == [
        {"image": "images/google/1f431.png", "caption": ["cat face"]}
    ]

    for split_vendor in ("val_google", "val_twitter", "test_google", "test_twitter"):
        for entry in load_manifest(out / f"{split_vendor}.json"):  # the project's loader; paths exist
            assert entry.image.is_file() and len(entry.captions) == 1
            with Image.open(entry.image) as im:
                assert im.mode == "RGB" and im.size == (4, 4)
                assert im.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white
                assert im.getpixel((3, 0)) in {(200, 0, 0), (60, 60, 60)}  # opaque red, or grey for LA
    assert find_complete_build(out, VENDORS)["counts"] == counts
    assert find_complete_build(out, ("google",)) is None  # other vendors: not reusable


def test_failed_build_leaves_no_manifest(sources: EmojiSources, tmp_path: Path, monkeypatch) -> None:
    real = emoji_build.composite_on_white
    calls = []

    def flaky(src: Path, dst: Path) -> None:
        calls.append(src)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real(src, dst)

    out = tmp_path / "out"
    monkeypatch.setattr(emoji_build, "composite_on_white", flaky)
    with pytest.raises(OSError, match="simulated"):
        build_dataset(sources, out, VENDORS)
    assert not out.exists() and _no_partial_dirs(tmp_path)

    # A failed rebuild keeps the previous complete build untouched.
    monkeypatch.setattr(emoji_build, "composite_on_white", real)
    build_dataset(sources, out, VENDORS)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    calls.clear()
    monkeypatch.setattr(emoji_build, "composite_on_white", flaky)
    with pytest.raises(OSError):
        build_dataset(sources, out, VENDORS)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert _no_partial_dirs(tmp_path)


def test_missing_image_file_is_a_clear_error(sources: EmojiSources, tmp_path: Path) -> None:
    (sources.images["google"] / "img/google/64/1f44b.png").unlink()
    with pytest.raises(EmojiDataError, match=r"missing file .*1f44b\.png.*has_img_google"):
        build_dataset(sources, tmp_path / "out", VENDORS)
    assert not (tmp_path / "out").exists() and _no_partial_dirs(tmp_path)


def test_missing_package_file_and_foreign_out_dir(sources: EmojiSources, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(EmojiDataError, match="refusing to replace"):
        build_dataset(sources, foreign, VENDORS)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (sources.datasource / "emoji.json").unlink()
    with pytest.raises(EmojiDataError, match="missing file .*emoji.json"):
        build_dataset(sources, tmp_path / "out", VENDORS)


# --- CLI and npm cache (with a fake `npm`) --------------------------------------------------------


def test_cli_reports_missing_npm(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm here
    assert main(["emoji", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 1
    assert "`npm`" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_cli_reuses_complete_build_without_npm(sources: EmojiSources, tmp_path: Path, monkeypatch, capsys) -> None:
    build_dataset(sources, tmp_path / "out", VENDORS)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["emoji", "--out", str(tmp_path / "out")]) == 0
    assert "already holds a complete build" in capsys.readouterr().out


def test_cli_restricted_vendors_need_the_flag(tmp_path: Path, capsys) -> None:
    assert main(["emoji", "--out", str(tmp_path / "out"), "--vendors", "apple"]) == 1
    assert "--include-restricted-vendors" in capsys.readouterr().err


@pytest.fixture
def fake_npm(tmp_path: Path, monkeypatch) -> dict:
    """A fake `npm` on PATH that "packs" a prepared tarball and logs its calls."""
    pkg_dir = tmp_path / "src/package"
    pkg_dir.mkdir(parents=True)
    (pkg_dir / "emoji.json").write_text("[]")
    (pkg_dir / "README.md").write_text("not extracted")
    tarball = tmp_path / "src/fake-pkg-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(pkg_dir, arcname="package")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "npm"
    script.write_text(f"""#!{sys.executable}
import json, os, shutil, sys
with open(os.environ["FAKE_NPM_LOG"], "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_NPM_FAIL"):
    sys.stderr.write("npm error 404 Not Found - fake-pkg@1.0.0\\n")
    sys.exit(1)
shutil.copy(os.environ["FAKE_NPM_TARBALL"], os.getcwd())
print(json.dumps([{{"id": sys.argv[2], "filename": "fake-pkg-1.0.0.tgz",
                    "integrity": os.environ["FAKE_NPM_INTEGRITY"]}}]))
""")
    script.chmod(0o755)
    log = tmp_path / "npm.log"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NPM_LOG", str(log))
    monkeypatch.setenv("FAKE_NPM_TARBALL", str(tarball))
    monkeypatch.setenv("FAKE_NPM_INTEGRITY", sha512_integrity(tarball))
    return {"log": log, "integrity": sha512_integrity(tarball), "cache": tmp_path / "cache"}


def _npm_calls(fake: dict) -> int:
    return len(fake["log"].read_text().splitlines()) if fake["log"].exists() else 0


def test_fetch_caches_and_refetches_corrupt_tarball(fake_npm: dict) -> None:
    pkg, cache = NpmPackage("fake-pkg", "1.0.0"), fake_npm["cache"]
    folder = fetch_package(pkg, cache, include=("package/emoji.json",))
    assert (folder / "emoji.json").read_text() == "[]" and not (folder / "README.md").exists()
    assert _npm_calls(fake_npm) == 1 and fake_npm["log"].read_text().startswith("pack fake-pkg@1.0.0 --json")
    assert (cache / "fake-pkg-1.0.0.integrity").read_text().strip() == fake_npm["integrity"]

    fetch_package(pkg, cache, include=("package/emoji.json",))
    assert _npm_calls(fake_npm) == 1  # verified cache hit

    tgz = cache / "fake-pkg-1.0.0.tgz"
    tgz.write_bytes(tgz.read_bytes()[:-10] + b"corrupted!")
    folder = fetch_package(pkg, cache, include=("package/emoji.json",))
    assert _npm_calls(fake_npm) == 2 and sha512_integrity(tgz) == fake_npm["integrity"]
    assert (folder / "emoji.json").is_file()


def test_fetch_rejects_tarball_that_differs_from_pin(fake_npm: dict) -> None:
    pinned = NpmPackage("fake-pkg", "1.0.0", "sha512-" + "A" * 86 + "==")
    with pytest.raises(NpmError, match="expected the pinned"):
        fetch_package(pinned, fake_npm["cache"])


def test_failed_npm_pack_shows_stderr(fake_npm: dict, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(NpmError, match=r"failed with exit code 1:\nnpm error 404 Not Found"):
        fetch_package(NpmPackage("fake-pkg", "1.0.0"), fake_npm["cache"])


# --- the real thing ---------------------------------------------------------------------------


def _registry_reachable() -> bool:
    if shutil.which("npm") is None:
        return False
    try:
        return subprocess.run(["npm", "ping"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slow
def test_real_build(tmp_path: Path, capsys) -> None:
    """Builds the real set (uses the download cache, ~200 MB; ~15 s when cached)."""
    if not _registry_reachable():
        pytest.skip("npm is not on PATH or the npm registry is unreachable")
    out = tmp_path / "emoji"
    assert main(["emoji", "--out", str(out)]) == 0
    info = json.loads((out / "build_info.json").read_text())
    images = info["counts"]["images"]
    for vendor in VENDORS:
        total = sum(images[s][vendor] for s in ("train", "val", "test"))
        assert total > 3500 and 0.15 < images["test"][vendor] / total < 0.25
    thumbs = json.loads((out / "test_google.json").read_text())
    assert {"image": "images/google/1f44d.png", "caption": ["thumbs up"]} in thumbs
    assert "train" in capsys.readouterr().out
