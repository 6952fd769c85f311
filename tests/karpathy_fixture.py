"""A small Karpathy-format split file with its images, built by the tests themselves (synthetic shapes).

COCO layout: ``<root>/dataset_coco.json`` and images under ``<root>/train2014`` / ``<root>/val2014`` (the entries'
``filepath``); Flickr30K layout: ``<root>/dataset_flickr30k.json`` and the JPEG files directly in ``<root>/images``
(entries without ``filepath``). Each image has five captions; the first test image has a sixth (COCO has a few).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from cots.data.synthetic import render_item

COCO_COUNTS = {"train": 16, "restval": 8, "val": 6, "test": 10}


def five_captions(captions: list[str]) -> list[str]:
    """The synthetic set's three phrasings and two more."""
    return [*captions, f"a picture: {captions[0]}", f"shapes, {captions[1]}"]


def write_karpathy(
    root: Path, dataset: str = "coco", counts: dict[str, int] | None = None, image_size: int = 32, seed: int = 0
) -> Path:
    """Write the images and the split file under ``root``; return the file's path."""
    counts = counts or COCO_COUNTS
    rng = np.random.default_rng(seed)
    images, sentence_id = [], 0
    for split, count in counts.items():
        for _ in range(count):
            image_id = len(images)
            picture, captions = render_item(rng, image_size)
            captions = five_captions(captions)
            if split == "test" and not any(item["split"] == "test" for item in images):
                captions.append("a sixth caption the protocol leaves out")
            if dataset == "coco":
                folder = "train2014" if split == "train" else "val2014"
                item = {"filepath": folder, "filename": f"COCO_{folder}_{image_id:012d}.jpg", "cocoid": image_id}
                path = root / folder / item["filename"]
            else:
                item = {"filename": f"{1000 + image_id}.jpg"}
                path = root / "images" / item["filename"]
            path.parent.mkdir(parents=True, exist_ok=True)
            picture.save(path, quality=95)
            sentences = [
                {"raw": text, "tokens": text.lower().split(), "imgid": image_id, "sentid": sentence_id + j}
                for j, text in enumerate(captions)
            ]
            item.update(split=split, sentences=sentences, imgid=image_id)
            item["sentids"] = [s["sentid"] for s in sentences]
            sentence_id += len(sentences)
            images.append(item)
    path = root / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path
