"""``cots-data shards``: a manifest's image-caption pairs into deterministic WebDataset tars.

The layout is described in :mod:`cots.data.shards`, which reads them.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import tarfile
from array import array
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image

from cots.data.datasets import clean_caption
from cots.data.images import BadSample, load_rgb
from cots.data.manifest import load_manifest
from cots.data.shards import FORMAT, INDEX_NAME, KEY_DIGITS, VERSION, ShardError
from cots.data.token_cache import file_sha1

# PIL format -> member extension (WebDataset's names); other formats use their lower-case name.
IMAGE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


def image_format(path: Path) -> tuple[str | None, str | None]:
    """(member extension, None) of a fully decodable image, else (None, skip reason).

    The whole image is decoded, with the training decoder, so truncated files are caught at
    conversion and not in the middle of a run.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "missing_file"
    except OSError:
        return None, "unreadable_file"
    try:
        load_rgb(io.BytesIO(data))
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except BadSample as bad:
        return None, bad.reason
    except Exception:  # anything PIL raises on a file that load_rgb accepted
        return None, "undecodable"
    return IMAGE_EXTENSIONS.get(fmt, fmt.lower() or "img"), None


def image_formats(paths: list[Path], workers: int) -> Iterator[tuple[str | None, str | None]]:
    """image_format of each path, in order; ``workers`` > 1 decode in a process pool."""
    if workers <= 1:
        yield from map(image_format, paths)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(image_format, paths, chunksize=16)


class _TarShardWriter:
    """Deterministic tars of at most ``shard_size`` samples and ``max_bytes`` each.

    Each shard is written to ``<name>.tmp`` and renamed when closed.
    """

    def __init__(self, out_dir: Path, shard_size: int, max_bytes: int | None) -> None:
        self.out_dir, self.shard_size, self.max_bytes = out_dir, shard_size, max_bytes
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(data) // 512) * 512 for data in members.values())  # header + padded data
        # The file: members, two zero blocks, padded to tarfile's 10240-byte records.
        file_bytes = -(-(self._bytes + size + 1024) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE
        full = self._count >= self.shard_size or (self.max_bytes and file_bytes > self.max_bytes)
        if self._tar is not None and full:
            self._close()
        if self._tar is None:
            path = self.out_dir / f"shard-{len(self.shards):06d}.tar.tmp"
            self._tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def _close(self) -> None:
        tmp = Path(self._tar.name)
        self._tar.close()
        path = tmp.with_suffix("")  # drop .tmp
        tmp.replace(path)
        self.shards.append(
            {"name": path.name, "samples": self._count, "bytes": path.stat().st_size, "sha1": file_sha1(path)}
        )
        self._tar, self._count, self._bytes = None, 0, 0

    def finish(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.shards


def write_shards(
    manifest: str | Path,
    out_dir: str | Path,
    image_root: str | Path | None = None,
    shard_size: int = 1000,
    max_shard_bytes: int | None = None,
    workers: int = 1,
    shuffle_seed: int | None = 0,
    image_column: str = "image",
    caption_column: str = "caption",
) -> dict:
    """Convert a JSON or CSV manifest into ``out_dir/shard-*.tar`` + ``out_dir/shards.json``.

    Two passes: every image is decoded once to check it (in ``workers`` processes), then the
    usable pairs are written in a permutation seeded by ``shuffle_seed`` (None: manifest
    order), reading the image files again. Shuffling at write time spreads the captions of one
    image over many shards; in manifest order they sit side by side and a reader's shuffle
    buffer would often put two of them in one batch (false negatives for the contrastive loss).

    Args:
        shard_size: samples (pairs) per shard.
        max_shard_bytes: also start a new shard before the file would pass this size (a
            sample larger than that gets a shard of its own), or None.
        workers: processes that check images (the output is identical for any number).

    Returns:
        The index written to ``shards.json``.
    """
    if shard_size < 1:
        raise ShardError(f"shard size must be at least 1, got {shard_size}")
    manifest, out_dir = Path(manifest), Path(out_dir)
    entries = load_manifest(manifest, image_root, image_column, caption_column)
    root = Path(image_root) if image_root else manifest.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / INDEX_NAME).unlink(missing_ok=True)  # from here on, the folder reads as unfinished

    # Pass 1: number the pairs as ImageTextPairs does; keep those whose image decodes.
    skipped_pairs: Counter[str] = Counter()
    skipped_images: Counter[str] = Counter()
    pair_image, pair_caption = array("q"), array("q")  # of each usable pair: image and caption index
    pair_numbers = array("q")  # its manifest pair index
    extensions: dict[int, str] = {}
    pair_index = 0
    for image_index, (entry, (ext, reason)) in enumerate(
        zip(entries, image_formats([e.image for e in entries], workers), strict=False)
    ):
        captions = [clean_caption(c) for c in entry.captions]
        skipped_pairs["empty_caption"] += captions.count("")
        usable = [j for j, caption in enumerate(captions) if caption]
        if not usable:
            skipped_images["no_caption"] += 1
        elif reason:
            skipped_images[reason] += 1
            skipped_pairs[reason] += len(usable)
        else:
            extensions[image_index] = ext
            pair_image.extend([image_index] * len(usable))
            pair_caption.extend(usable)
            pair_numbers.extend(range(pair_index, pair_index + len(usable)))
        pair_index += len(usable)
    if not pair_numbers:
        raise ShardError(f"{manifest}: no usable image-caption pair (skipped images: {dict(skipped_images)})")

    # Pass 2: write them.
    order = range(len(pair_numbers))
    if shuffle_seed is not None:
        order = torch.randperm(len(pair_numbers), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    writer = _TarShardWriter(out_dir, shard_size, max_shard_bytes)
    for k in order:
        image_index, caption_index = pair_image[k], pair_caption[k]
        entry = entries[image_index]
        try:
            data = entry.image.read_bytes()
        except OSError as err:
            raise ShardError(f"{entry.image}: readable in the first pass, not in the second ({err})") from err
        relative = entry.image.relative_to(root) if entry.image.is_relative_to(root) else entry.image
        meta = {
            "pair_index": pair_numbers[k],
            "image_index": image_index,
            "caption_index": caption_index,
            "image": str(relative),
        }
        writer.add(
            f"{pair_numbers[k]:0{KEY_DIGITS}d}",
            {
                extensions[image_index]: data,
                "txt": clean_caption(entry.captions[caption_index]).encode("utf-8"),
                "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
            },
        )
    shards = writer.finish()
    names = {s["name"] for s in shards}
    for stale in out_dir.glob("shard-*.tar*"):  # shards of an earlier, larger conversion
        if stale.name not in names:
            stale.unlink()
    index = {
        "format": FORMAT,
        "version": VERSION,
        "source": {"manifest": str(manifest.resolve()), "sha1": file_sha1(manifest), "image_root": str(root.resolve())},
        "shard_size": shard_size,
        "max_shard_bytes": max_shard_bytes,
        "shuffle_seed": shuffle_seed,
        "num_samples": len(pair_numbers),
        "num_images": len(extensions),
        "num_manifest_pairs": pair_index,
        "skipped_pairs": dict(sorted((k, v) for k, v in skipped_pairs.items() if v)),
        "skipped_images": dict(sorted(skipped_images.items())),
        "shards": shards,
    }
    tmp = out_dir / f"{INDEX_NAME}.tmp"
    tmp.write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
    tmp.replace(out_dir / INDEX_NAME)
    return index
