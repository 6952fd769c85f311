"""Karpathy's split files (``dataset_coco.json``, ``dataset_flickr30k.json``) read as they are.

The format: ``{"dataset": "coco", "images": [{"filepath": "val2014", "filename": "COCO_val2014_...jpg",
"split": "train" | "restval" | "val" | "test", "sentences": [{"raw": "...", "tokens": [...]}, ...], ...}]}``.
Flickr30K entries have no ``filepath``: their images lie directly under the image root. Each image becomes a
:class:`ManifestEntry` (``image_root / filepath / filename``, its captions), in file order (the order the COCO
1K folds are cut in, ``cots.metrics.folds``).

Splits: ``train`` (with COCO's ``restval`` when ``restval_in_train``: the 113,287 training images of the usual
COCO protocol), ``val`` and ``test``. Captions: training keeps every caption; the ``val`` and ``test`` galleries
keep the first ``captions_per_image`` (the five of the protocol: a few COCO images have six or seven) and refuse
an image with fewer, since its gallery would not be the one papers score. ``captions_per_image=None`` keeps all.
"""

from __future__ import annotations

import json
from pathlib import Path

from cots.data.manifest import ManifestEntry, ManifestError

DATASETS = ("coco", "flickr30k", "flickr8k")
FILE_SPLITS = ("train", "restval", "val", "test")
SPLITS = ("train", "val", "test")


class KarpathyError(ManifestError):
    """A Karpathy split file that cannot be used; the message names the file and the entry (``images[i]``)."""


def read_karpathy_splits(
    path: str | Path,
    image_root: str | Path,
    dataset: str,
    restval_in_train: bool = True,
    captions_per_image: int | None = 5,
) -> dict[str, list[ManifestEntry]]:
    """``{"train", "val", "test"}`` -> entries, each split in file order.

    Args:
        path: the Karpathy JSON file.
        image_root: the folder ``filepath / filename`` is relative to (COCO: the folder holding ``train2014/``
            and ``val2014/``; Flickr30K: the folder holding the JPEG files, e.g. ``flickr30k-images``).
        dataset: ``coco``, ``flickr30k`` or ``flickr8k``; must equal the file's ``dataset`` field when it has one.
        restval_in_train: put COCO's ``restval`` images (30,504) into ``train``; false leaves them out.
        captions_per_image: captions kept per ``val`` / ``test`` image (the first ones); None keeps all.
    Raises:
        KarpathyError: a missing or unreadable file, another dataset, or an entry that is not an image with a
            known split, a file name and caption strings (named by its index, file name and what is wrong).
    """
    path = Path(path)
    if dataset not in DATASETS:
        raise KarpathyError(f"data.dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    images = _read_images(path, dataset)
    root = Path(image_root)
    splits: dict[str, list[ManifestEntry]] = {split: [] for split in SPLITS}
    for index, item in enumerate(images):
        split, entry = _entry(item, index, path, root)
        if split == "restval":
            if not restval_in_train:
                continue
            split = "train"
        if split != "train" and captions_per_image is not None:
            if len(entry.captions) < captions_per_image:
                raise KarpathyError(
                    f"{path}: {_where(index, item)}: a {split} image with {len(entry.captions)} caption(s), "
                    f"fewer than data.captions_per_image={captions_per_image}"
                )
            entry.captions = entry.captions[:captions_per_image]
        splits[split].append(entry)
    return splits


def _read_images(path: Path, dataset: str) -> list:
    if not path.is_file():
        raise KarpathyError(f"Karpathy split file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8", errors="replace"))
    except json.JSONDecodeError as err:
        raise KarpathyError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise KarpathyError(f"{path}: expected a Karpathy split file, an object with an 'images' list")
    declared = data.get("dataset")
    if declared is not None and declared != dataset:
        raise KarpathyError(f"{path} holds dataset {declared!r}, but data.dataset={dataset!r}")
    return data["images"]


def _where(index: int, item) -> str:
    """``images[i] (file name)``: how an error names an entry."""
    name = item.get("filename") if isinstance(item, dict) else None
    return f"images[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")


def _entry(item, index: int, path: Path, root: Path) -> tuple[str, ManifestEntry]:
    """One image of the file: its split and its entry (absolute image path, caption strings)."""
    where = f"{path}: {_where(index, item)}"
    if not isinstance(item, dict):
        raise KarpathyError(f"{where}: not an object (got {json.dumps(item)[:80]})")
    split = item.get("split")
    if split not in FILE_SPLITS:
        raise KarpathyError(f"{where}: 'split' must be one of {', '.join(FILE_SPLITS)}, got {json.dumps(split)}")
    filename, filepath = item.get("filename"), item.get("filepath")
    if not isinstance(filename, str) or not filename:
        raise KarpathyError(f"{where}: no 'filename' (got {json.dumps(filename)[:80]})")
    if filepath is not None and not isinstance(filepath, str):
        raise KarpathyError(f"{where}: 'filepath' must be a string, got {json.dumps(filepath)[:80]}")
    sentences = item.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise KarpathyError(f"{where}: 'sentences' must be a non-empty list, got {json.dumps(sentences)[:80]}")
    captions = [_caption(sentence, f"{where}: sentences[{j}]") for j, sentence in enumerate(sentences)]
    return split, ManifestEntry(root / (filepath or "") / filename, captions)


def _caption(sentence, where: str) -> str:
    """A sentence's ``raw`` text (its ``tokens`` joined when it has no ``raw``)."""
    if isinstance(sentence, dict):
        raw, tokens = sentence.get("raw"), sentence.get("tokens")
        if isinstance(raw, str):
            return raw
        if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
            return " ".join(tokens)
    raise KarpathyError(
        f"{where}: needs a 'raw' string (or a 'tokens' list of strings), got {json.dumps(sentence)[:80]}"
    )
