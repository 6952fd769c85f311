"""Image-text manifests: the standard JSON list and CSV.

JSON: ``[{"image": "relative/path.jpg", "caption": "a dog" | ["a dog", "a puppy"]}, ...]``
CSV:  a header with an image column and a caption column (names configurable);
      rows with the same image are grouped into one entry with several captions.

Image paths are relative to ``image_root`` (default: the manifest's folder).
This module only reads; the offline builders write with :mod:`cots.prepare.manifest_writer`.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the entry."""


@dataclass
class ManifestEntry:
    image: Path
    captions: list[str] = field(default_factory=list)


def load_manifest(
    path: str | Path,
    image_root: str | Path | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
) -> list[ManifestEntry]:
    """Read a JSON or CSV manifest into entries with absolute image paths.

    Entries are returned in file order; for CSV, rows sharing an image are merged
    (first appearance decides the order). Captions are kept as written: cleaning
    and rejecting empty ones is the dataset's job, so that it can count them.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest file not found: {path}")
    root = Path(image_root) if image_root else path.parent
    if path.suffix.lower() == ".csv":
        rows = _read_csv(path, image_column, caption_column)
    else:
        rows = _read_json(path)
    merged: dict[str, ManifestEntry] = {}
    for i, (image, captions) in enumerate(rows):
        if not isinstance(image, str) or not image:
            raise ManifestError(f"{path}: entry {i} has no 'image' path (got {json.dumps(image)[:80]})")
        entry = merged.setdefault(image, ManifestEntry(root / image))
        entry.captions.extend(captions)
    return list(merged.values())


def _read_json(path: Path) -> list[tuple[str, list[str]]]:
    try:
        # Bytes that are not UTF-8 (a mis-encoded caption) become U+FFFD instead of failing the file.
        data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, list):
        raise ManifestError(f"{path}: expected a JSON list of {{'image', 'caption'}} objects")
    rows = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or "image" not in item:
            raise ManifestError(f"{path}: entry {i} is not an object with an 'image' key")
        rows.append((item["image"], _captions_of(item.get("caption"), path, i)))
    return rows


def _captions_of(caption, path: Path, index: int) -> list[str]:
    """A caption string or a list of strings; null is no caption (an empty string is kept, to be counted)."""
    if caption is None:
        return []
    if isinstance(caption, str):
        return [caption]
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        return list(caption)
    found = type(caption).__name__ if not isinstance(caption, list) else "a list holding " + ", ".join(
        sorted({type(c).__name__ for c in caption if not isinstance(c, str)}))
    raise ManifestError(f"{path}: entry {index}: 'caption' must be a string or a list of strings, got {found}: "
                        f"{json.dumps(caption)[:80]}")


def _read_csv(path: Path, image_column: str, caption_column: str) -> list[tuple[str, list[str]]]:
    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        missing = {image_column, caption_column} - set(reader.fieldnames or [])
        if missing:
            raise ManifestError(f"{path}: missing CSV column(s) {sorted(missing)}; found {reader.fieldnames}")
        return [(row[image_column], [row[caption_column] or ""]) for row in reader]

