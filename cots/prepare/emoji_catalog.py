"""The emoji catalogue: emoji-datasource entries joined with CLDR names and keywords.

Every image is an :class:`EmojiItem`: a base emoji or one of its skin-tone variants.
Its caption comes from CLDR, joined on the emoji string built from ``unified``
(``"1F44D-1F3FB"`` -> ``"👍🏻"``) with U+FE0F removed on both sides: emoji-datasource
writes fully-qualified sequences (``"2764-FE0F"``) while CLDR keys may omit the
variation selector, and the selector does not change which emoji is meant.

The split is by concept group (the base emoji), never by image, so that the same
emoji drawn by another vendor or in another skin tone cannot leak from train to test.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FE0F = "\ufe0f"  # VARIATION SELECTOR-16 (emoji presentation)
TEST_PERCENT = 20
VAL_PERCENT = 10
VAL_SALT = ":val"
SPLIT_RULE = (
    f"group = base emoji's `unified` in upper case (skin-tone variants share their base's group); "
    f"test if int(sha1(group).hexdigest(), 16) % 100 < {TEST_PERCENT}, "
    f"else val if int(sha1(group + '{VAL_SALT}').hexdigest(), 16) % 100 < {VAL_PERCENT}, "
    f"else train (so val is ~{VAL_PERCENT}% of the non-test groups)"
)


class EmojiDataError(ValueError):
    """Input data that cannot be used; the message names the file or the entry."""


@dataclass(frozen=True)
class CldrAnnotation:
    """CLDR English annotation of one emoji."""

    name: str  # the text-to-speech name, e.g. "thumbs up: light skin tone"
    keywords: tuple[str, ...]  # the "default" keywords, in CLDR order


@dataclass(frozen=True)
class EmojiItem:
    """One image of the catalogue (before choosing a vendor)."""

    unified: str  # this emoji's code points, e.g. "1F44D-1F3FB"
    base: str  # the base emoji's `unified` in upper case: the split group, e.g. "1F44D"
    image: str  # file name under img/<vendor>/64/, e.g. "1f44d-1f3fb.png"
    name: str
    keywords: tuple[str, ...]
    vendors: frozenset[str]  # vendors whose `has_img_<vendor>` is true


def emoji_string(unified: str) -> str:
    """``"1F44D-1F3FB"`` -> the emoji as a Python string (one character per code point)."""
    try:
        return "".join(chr(int(cp, 16)) for cp in unified.split("-"))
    except ValueError as err:
        raise EmojiDataError(f"bad `unified` code point list {unified!r}") from err


def join_key(emoji: str) -> str:
    """The CLDR join key: the emoji string without U+FE0F."""
    return emoji.replace(FE0F, "")


def read_json(path: Path, what: str) -> Any:
    """Read a JSON file, naming ``what`` (e.g. "emoji-datasource's emoji.json") on failure."""
    if not path.is_file():
        raise EmojiDataError(f"missing file {path} ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EmojiDataError(f"{path} ({what}) is not valid JSON: {err}") from err


def load_cldr(annotations: Path, derived: Path) -> dict[str, CldrAnnotation]:
    """Merge CLDR ``annotations`` and ``annotationsDerived`` JSON files, keyed by :func:`join_key`.

    Entries without a ``tts`` name are left out (they cannot caption a test image).
    """
    merged: dict[str, CldrAnnotation] = {}
    for path, top in ((annotations, "annotations"), (derived, "annotationsDerived")):
        data = read_json(path, f"CLDR {top}")
        try:
            entries = data[top]["annotations"]
        except (KeyError, TypeError) as err:
            raise EmojiDataError(f"{path}: expected {{'{top}': {{'annotations': {{...}}}}}}") from err
        for emoji, entry in entries.items():
            tts = [t.strip() for t in entry.get("tts", []) if t.strip()]
            if tts:
                # setdefault: the plain annotations win over derived ones on a (rare) clash.
                merged.setdefault(join_key(emoji), CldrAnnotation(tts[0], tuple(entry.get("default", []))))
    return merged


def load_catalog(
    emoji_json: Path, cldr: dict[str, CldrAnnotation], vendors: tuple[str, ...]
) -> tuple[list[EmojiItem], list[str]]:
    """Items of emoji-datasource's ``emoji.json`` that have a CLDR caption, in file order.

    Returns ``(items, skipped)`` where ``skipped`` lists the ``unified`` of the base
    emoji and skin-tone variants that have no CLDR entry.
    """
    entries = read_json(emoji_json, "emoji-datasource's emoji.json")
    if not isinstance(entries, list):
        raise EmojiDataError(f"{emoji_json}: expected a JSON list of emoji entries")
    items: list[EmojiItem] = []
    skipped: list[str] = []
    for i, entry in enumerate(entries):
        try:
            base = entry["unified"].upper()
            variants = [entry, *(entry.get("skin_variations") or {}).values()]
            for v in variants:
                annotation = cldr.get(join_key(emoji_string(v["unified"])))
                if annotation is None:
                    skipped.append(v["unified"])
                    continue
                has = frozenset(x for x in vendors if v.get(f"has_img_{x}", False))
                items.append(EmojiItem(v["unified"], base, v["image"], annotation.name, annotation.keywords, has))
        except (KeyError, TypeError, AttributeError) as err:
            raise EmojiDataError(f"{emoji_json}: entry {i} lacks a field ({err!r}): {str(entry)[:200]}") from err
    return items, skipped


def _percentile(key: str) -> int:
    """A stable pseudo-random number in [0, 100) from ``key`` (sha1, not Python's salted hash)."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 100


def split_of(base: str, test_percent: int = TEST_PERCENT, val_percent: int = VAL_PERCENT) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a concept group; see :data:`SPLIT_RULE`."""
    group = base.upper()
    if _percentile(group) < test_percent:
        return "test"
    if _percentile(group + VAL_SALT) < val_percent:
        return "val"
    return "train"


def train_captions(item: EmojiItem) -> list[str]:
    """The CLDR name, then all its keywords as one phrase; no duplicates.

    E.g. ``["thumbs up", "+1, good, hand, like, thumb, up, yes"]``. Single keywords
    are not captions of their own: "man" alone would describe 900 images, a weak
    label that also puts false negatives into every contrastive batch.
    """
    captions = [item.name]
    seen = {item.name.casefold()}
    keywords = [k.strip() for k in item.keywords if k.strip() and k.strip().casefold() not in seen]
    keywords = list(dict.fromkeys(keywords))  # dedupe, keep CLDR order
    if keywords:
        phrase = ", ".join(keywords)
        if phrase.casefold() not in seen:
            captions.append(phrase)
    return captions
