"""Build the emoji image-text dataset from extracted npm packages.

Fetching (:func:`fetch_sources`, needs npm) is separate from building
(:func:`build_dataset`, needs only the extracted ``package/`` folders), so the build
can be tested on a small fake tree.

Output in ``out/``::

    images/<vendor>/<image>.png    64x64 RGB PNG, composited on white
    train.json                     [{"image": "images/google/1f44d.png", "caption": "thumbs up"}, ...]
                                   one entry per image-caption pair, all vendors
    val_<vendor>.json, test_<vendor>.json
                                   [{"image": ..., "caption": ["thumbs up"]}, ...] one entry per image
    build_info.json                versions, counts, licences, split rule; written last

The build happens in a hidden sibling folder that is renamed to ``out`` only when
complete, so a failed or interrupted build never leaves manifests without images.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cots.prepare.emoji_catalog import (
    SPLIT_RULE,
    EmojiDataError,
    EmojiItem,
    load_catalog,
    load_cldr,
    split_of,
    train_captions,
)
from cots.prepare.manifest_writer import write_manifest
from cots.prepare.npm_packages import NpmPackage, fetch_package

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the output layout or captions change, to force a rebuild
SPLITS = ("train", "val", "test")
OPEN_VENDORS = ("google", "twitter")
RESTRICTED_VENDORS = ("apple", "facebook")
VENDOR_LICENCES = {
    "google": "Apache-2.0 (Noto Emoji images by Google)",
    "twitter": "CC-BY-4.0 (Twemoji graphics by Twitter, Inc. and contributors; attribution required)",
    "apple": "not openly licensed: Copyright Apple Inc., not licensed for commercial use",
    "facebook": "not openly licensed: Copyright Facebook, Inc., no clear licensing",
}
OTHER_LICENCES = {
    "emoji-datasource": "MIT (emoji metadata, Cal Henderson)",
    "cldr": "Unicode-3.0 (CLDR annotations, Unicode, Inc.)",
}

# Pinned versions with the registry's sha512 integrity: a different tarball is rejected.
PACKAGES: dict[str, NpmPackage] = {
    "emoji-datasource": NpmPackage(
        "emoji-datasource",
        "16.0.0",
        "sha512-/qHKqK5Nr3+8zhgO6kHmF43Fm5C8HNn0AaFRIpgw8HF3+uF0Vfc8jgLI1ZQS5ba1vBzksS8NBCjHejwLb2D/Sg==",
    ),  # noqa: E501
    "cldr-annotations": NpmPackage(
        "cldr-annotations-full",
        "48.2.0",
        "sha512-DV7A+rEcgUSNTRsVGNGqBZRmAkGfwhGHO5Q1dRwzBoBnVrHWp804JP7/QJdEc66iHmx3+zLWVIMCFLm0lW7PUQ==",
    ),  # noqa: E501
    "cldr-derived": NpmPackage(
        "cldr-annotations-derived-full",
        "48.2.0",
        "sha512-log62km+AOzI7n/NEuNNFV0mg9DWnt67EYCh1RwxZq9dyRuyteB586LT83Ke8TchEfnwI9cIk2P31zO4nTvZmw==",
    ),  # noqa: E501
    "google": NpmPackage(
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
    ),  # noqa: E501
    "twitter": NpmPackage(
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
    ),  # noqa: E501
    "apple": NpmPackage(
        "emoji-datasource-apple",
        "16.0.0",
        "sha512-dVYjsK0FnCry9F+PBtnivhG2K0xdwlmqYaSgiUtztUdAGPYiHYhZcVKvNBqC791g2qyEcFNTBO6utg4eQ3uLTw==",
    ),  # noqa: E501
    "facebook": NpmPackage(
        "emoji-datasource-facebook",
        "16.0.0",
        "sha512-b9ZxJdB7nMWGckH1vyCjPSosaa6MJYuojPPFiQ0LmDIZS8vlG454XKcmTFKrXIMAA72O4MRJMYFhvWI8pjyciQ==",
    ),  # noqa: E501
}
_COMMON = ("package/LICENSE", "package/package.json")


@dataclass(frozen=True)
class EmojiSources:
    """Extracted ``package/`` folders of the npm packages the build reads."""

    datasource: Path  # emoji-datasource: emoji.json
    annotations: Path  # cldr-annotations-full: annotations/en/annotations.json
    derived: Path  # cldr-annotations-derived-full: annotationsDerived/en/annotations.json
    images: dict[str, Path]  # vendor -> emoji-datasource-<vendor>: img/<vendor>/64/*.png


def fetch_sources(vendors: tuple[str, ...], cache_dir: Path) -> EmojiSources:
    """Download (or reuse from ``cache_dir``) the packages for ``vendors``; needs npm."""

    def get(key: str, *include: str) -> Path:
        return fetch_package(PACKAGES[key], cache_dir, include + _COMMON)

    return EmojiSources(
        datasource=get("emoji-datasource", "package/emoji.json"),
        annotations=get("cldr-annotations", "package/annotations/en/"),
        derived=get("cldr-derived", "package/annotationsDerived/en/"),
        images={v: get(v, f"package/img/{v}/64/") for v in vendors},
    )


def _package_keys(vendors: tuple[str, ...]) -> list[str]:
    return ["emoji-datasource", "cldr-annotations", "cldr-derived", *vendors]


def reuse_key(vendors: tuple[str, ...]) -> dict:
    """The part of ``build_info.json`` that must match for an existing build to be reused."""
    return {
        "format": FORMAT_VERSION,
        "packages": {PACKAGES[k].name: PACKAGES[k].version for k in _package_keys(vendors)},
        "vendors": list(vendors),
        "split_rule": SPLIT_RULE,
    }


def find_complete_build(out: Path, vendors: tuple[str, ...]) -> dict | None:
    """``build_info.json`` of ``out`` if it is a complete build of the same inputs, else None."""
    try:
        info = json.loads((out / "build_info.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    key = reuse_key(vendors)
    return info if all(info.get(k) == v for k, v in key.items()) else None


def build_dataset(sources: EmojiSources, out: Path, vendors: tuple[str, ...]) -> dict:
    """Build the dataset into ``out`` (replacing a previous build there) and return its build info."""
    out = Path(out)
    _check_replaceable(out)
    cldr = load_cldr(
        sources.annotations / "annotations/en/annotations.json",
        sources.derived / "annotationsDerived/en/annotations.json",
    )
    items, no_caption = load_catalog(sources.datasource / "emoji.json", cldr, vendors)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        info = _write_build(sources, items, tmp, vendors)
        info["counts"]["skipped_no_caption"] = len(no_caption)
        info["skipped_no_caption"] = no_caption
        # build_info.json last: its presence marks a complete build.
        (tmp / "build_info.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), encoding="utf-8")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _write_build(sources: EmojiSources, items: list[EmojiItem], tmp: Path, vendors: tuple[str, ...]) -> dict:
    """Write images and manifests into ``tmp``; return build info without the skip list."""
    train: list[dict] = []
    evals: dict[str, list[dict]] = {f"{s}_{v}": [] for s in ("val", "test") for v in vendors}
    images: dict[str, Counter] = {s: Counter() for s in SPLITS}
    no_image: Counter = Counter()
    groups: dict[str, set[str]] = {s: set() for s in SPLITS}
    name_pairs = 0
    names: dict[str, list[dict]] = {"train": [], "val": []}  # one (image, CLDR name) pair per image
    for item in items:
        split = split_of(item.base)
        groups[split].add(item.base)
        captions = train_captions(item) if split == "train" else [item.name]
        for vendor in vendors:
            if vendor not in item.vendors:
                no_image[vendor] += 1
                continue
            rel = f"images/{vendor}/{Path(item.image).stem}.png"
            src = sources.images[vendor] / "img" / vendor / "64" / item.image
            if not src.is_file():
                raise EmojiDataError(
                    f"missing file {src}: emoji.json says has_img_{vendor} for {item.unified} "
                    f"but the emoji-datasource-{vendor} package lacks it"
                )
            composite_on_white(src, tmp / rel)
            images[split][vendor] += 1
            if split in names:
                names[split].append({"image": rel, "caption": item.name})
            if split == "train":
                train.extend({"image": rel, "caption": c} for c in captions)
                name_pairs += 1
            else:
                evals[f"{split}_{vendor}"].append({"image": rel, "caption": captions})
    write_manifest(tmp / "train.json", train)
    # Names only: the pairs of the open_clip reference (train + val concepts, 5,948 at 16.0.0);
    # the test concepts stay out of both.
    write_manifest(tmp / "train_names.json", names["train"])
    write_manifest(tmp / "trainval_names.json", names["train"] + names["val"])
    for stem, entries in evals.items():
        write_manifest(tmp / f"{stem}.json", entries)
    return {
        **reuse_key(vendors),
        "integrity": {PACKAGES[k].name: PACKAGES[k].integrity for k in _package_keys(vendors)},
        "licences": {**{v: VENDOR_LICENCES[v] for v in vendors}, **OTHER_LICENCES},
        "counts": {
            "groups": {s: len(groups[s]) for s in SPLITS},
            "images": {s: {v: images[s][v] for v in vendors} for s in SPLITS},
            "train_pairs": len(train),
            "train_name_pairs": name_pairs,
            "trainval_name_pairs": len(names["train"]) + len(names["val"]),
            "skipped_no_image": {v: no_image[v] for v in vendors},
        },
    }


def composite_on_white(src: Path, dst: Path) -> None:
    """Save ``src`` (RGBA, LA or palette PNG, HxW) as an RGB PNG of the same size on white."""
    with Image.open(src) as im:
        # convert("RGBA") honours a palette's transparency entry; RGB would drop it.
        rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    canvas.alpha_composite(rgba)
    dst.parent.mkdir(parents=True, exist_ok=True)
    canvas.convert("RGB").save(dst, format="PNG")


def _check_replaceable(out: Path) -> None:
    """Refuse to replace anything but a missing/empty folder or a previous build."""
    if out.exists() and not out.is_dir():
        raise EmojiDataError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "build_info.json").is_file():
        raise EmojiDataError(
            f"refusing to replace {out}: it is not empty and holds no build_info.json "
            "(not an emoji build); choose a new or empty folder"
        )


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an old ``out`` is moved aside first, then deleted."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    old.rmdir()  # only the unique name is wanted; rename needs it absent
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)  # put the previous build back
        raise
    shutil.rmtree(old, ignore_errors=True)


def format_summary(info: dict) -> str:
    """Human-readable counts per split and vendor, from ``build_info.json``."""
    counts, vendors = info["counts"], info["vendors"]
    lines = [f"{'split':<6} {'groups':>6} " + " ".join(f"{v:>8}" for v in vendors) + f" {'total':>7}"]
    for split in SPLITS:
        row = [counts["images"][split][v] for v in vendors]
        lines.append(f"{split:<6} {counts['groups'][split]:>6} " + " ".join(f"{n:>8}" for n in row) + f" {sum(row):>7}")
    lines.append(
        f"train pairs: {counts['train_pairs']} ({counts['train_name_pairs']} with the CLDR name, "
        f"{counts['train_pairs'] - counts['train_name_pairs']} with keywords); "
        f"names only: train_names.json {counts['train_name_pairs']}, "
        f"trainval_names.json {counts.get('trainval_name_pairs', '?')}"
    )
    lines.append(
        f"skipped: {counts['skipped_no_caption']} emoji without a CLDR caption; without an image: "
        + ", ".join(f"{v} {n}" for v, n in counts["skipped_no_image"].items())
    )
    return "\n".join(lines)
