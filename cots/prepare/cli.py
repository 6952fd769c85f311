"""``cots-data``: build datasets. Subcommands: ``emoji``, ``shards``, ``index-shards``.

Each subcommand is an ``_add_<name>(subparsers)`` function that registers its
arguments and sets ``func`` to a runner ``(args) -> exit code``; add new ones to
``_SUBCOMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cots.data.manifest import ManifestError
from cots.prepare.emoji import (
    OPEN_VENDORS,
    RESTRICTED_VENDORS,
    VENDOR_LICENCES,
    build_dataset,
    fetch_sources,
    find_complete_build,
    format_summary,
)
from cots.prepare.emoji_catalog import EmojiDataError
from cots.prepare.npm_packages import NpmError, default_cache_dir, require_npm

log = logging.getLogger("cots.prepare")


def _add_emoji(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "emoji",
        help="emoji images (npm emoji-datasource-*) captioned with CLDR names and keywords",
        description=(
            "Download emoji-datasource 16.0.0, its vendor image packages and the CLDR 48.2 English "
            "annotations with `npm pack` (Node's npm must be on PATH), then write train/val/test "
            "manifests split by base emoji. Images: Google (Apache-2.0) and Twitter (CC-BY-4.0)."
        ),
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="download cache (default: $COTS_CACHE/npm, else ~/.cache/cots/npm)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds a complete build")
    p.add_argument(
        "--vendors",
        nargs="+",
        choices=OPEN_VENDORS + RESTRICTED_VENDORS,
        default=None,
        help=f"image sets to include (default: {' '.join(OPEN_VENDORS)})",
    )
    p.add_argument(
        "--include-restricted-vendors",
        action="store_true",
        help=(
            "also allow Apple and Facebook images (added to the default vendors unless --vendors is "
            f"given). Apple's are {VENDOR_LICENCES['apple']}; Facebook's are {VENDOR_LICENCES['facebook']}. "
            "Use them at your own risk, for research only, and do not redistribute the built set."
        ),
    )
    p.set_defaults(func=_run_emoji)


def _run_emoji(args: argparse.Namespace) -> int:
    vendors = tuple(args.vendors or OPEN_VENDORS + (RESTRICTED_VENDORS if args.include_restricted_vendors else ()))
    restricted = [v for v in vendors if v in RESTRICTED_VENDORS]
    if restricted and not args.include_restricted_vendors:
        raise EmojiDataError(
            f"vendor(s) {restricted} are not openly licensed; pass --include-restricted-vendors to use them"
        )
    if not args.force and (info := find_complete_build(args.out, vendors)) is not None:
        print(f"{args.out} already holds a complete build of the same packages (use --force to rebuild)")
        print(format_summary(info))
        return 0
    require_npm()  # fail before any work, with a clear message
    start = time.monotonic()
    sources = fetch_sources(vendors, args.cache or default_cache_dir())
    log.info("packages ready after %.1f s; building %s", time.monotonic() - start, args.out)
    info = build_dataset(sources, args.out, vendors)
    print(format_summary(info))
    print(f"wrote {args.out} in {time.monotonic() - start:.1f} s")
    return 0


def _add_shards(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "shards",
        help="WebDataset tar shards of a manifest's image-caption pairs, for streaming training",
        description=(
            "Write one sample per image-caption pair (original image bytes, caption, metadata) into "
            "DIR/shard-000000.tar ..., then DIR/shards.json. Images that cannot be decoded are "
            "skipped and counted per reason. The output is byte-identical on a re-run."
        ),
    )
    p.add_argument("--manifest", type=Path, required=True, help="JSON or CSV manifest")
    p.add_argument(
        "--image-root", type=Path, default=None, help="folder image paths are relative to (default: the manifest's)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="samples (pairs) per shard (default: 1000)")
    p.add_argument(
        "--max-shard-bytes", type=int, default=None, help="also start a new shard before one passes this size"
    )
    p.add_argument("--workers", type=int, default=1, help="processes that decode images to check them (default: 1)")
    p.add_argument(
        "--shuffle-seed",
        type=int,
        default=0,
        help="seed of the order pairs are written in (default: 0), so an image's captions land in different shards",
    )
    p.add_argument("--keep-order", action="store_true", help="write pairs in manifest order instead")
    p.add_argument("--image-column", default="image", help="CSV manifests: image column (default: image)")
    p.add_argument("--caption-column", default="caption", help="CSV manifests: caption column (default: caption)")
    p.set_defaults(func=_run_shards)


def _run_shards(args: argparse.Namespace) -> int:
    # Imported here: they import torch, which the other subcommands do without.
    from cots.data.shards import ShardError
    from cots.prepare.shard_writer import write_shards

    start = time.monotonic()
    try:
        index = write_shards(
            args.manifest,
            args.out,
            args.image_root,
            args.shard_size,
            args.max_shard_bytes,
            args.workers,
            None if args.keep_order else args.shuffle_seed,
            args.image_column,
            args.caption_column,
        )
    except (ShardError, ManifestError) as err:
        print(f"cots-data shards: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {index['num_samples']} pairs of {index['num_images']} images to {len(index['shards'])} shards "
        f"in {args.out} ({sum(s['bytes'] for s in index['shards']) / 1e6:.1f} MB, {time.monotonic() - start:.1f} s)"
    )
    print(f"skipped images: {index['skipped_images'] or 'none'}; skipped pairs: {index['skipped_pairs'] or 'none'}")
    return 0


def _add_index_shards(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index-shards",
        help="count the samples of WebDataset tars in place (img2dataset output), for exact epochs and resume",
        description=(
            "Read the tar headers of the shards (no image is decoded) and write their sample counts, sizes, "
            "mtimes (ETags) and seek offsets to cots-index.json beside them, or to --out. Resumable: shards "
            "already indexed and unchanged are kept; a changed one is refused unless --refresh."
        ),
    )
    p.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="a folder, glob or brace list of .tar shards, local or s3:// gs:// https:// (quote braces and globs)",
    )
    p.add_argument("--out", default=None, help="one index file for all sources (default: cots-index.json beside each)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel processes (default: all CPUs)")
    p.add_argument("--checksum", action="store_true", help="also record each shard's sha1 (reads every byte)")
    p.add_argument("--refresh", action="store_true", help="count shards that changed since indexed again")
    p.set_defaults(func=_run_index_shards)


def _run_index_shards(args: argparse.Namespace) -> int:
    from cots.data.shard_index import ShardError
    from cots.prepare.shard_indexer import index_shards

    try:
        summary = index_shards(args.sources, args.out, args.workers, args.checksum, args.refresh)
    except (ShardError, OSError) as err:
        print(f"cots-data index-shards: error: {err}", file=sys.stderr)
        return 1
    rate = ""
    if summary["scanned"]:
        rate = f": {summary['shards_per_s']:.1f} shards/s"
        if summary["samples_per_s"] is not None:
            rate += f", {summary['samples_per_s']:.0f} samples/s"
    print(
        f"indexed {summary['shards']} shards ({summary['scanned']} scanned, {summary['kept']} unchanged) holding "
        f"{summary['samples']} samples, {summary['bytes'] / 1e9:.2f} GB, in {summary['seconds']:.1f} s{rate}"
    )
    if summary["truncated"]:
        print(
            f"truncated shards (read up to the last complete sample): {len(summary['truncated'])}, "
            f"e.g. {summary['truncated'][0]}"
        )
    if summary["img2dataset"]:
        print(f"img2dataset's counts (_stats.json): {summary['img2dataset']}")
    return 0


_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_emoji, _add_shards, _add_index_shards]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cots-data", description="Build image-text datasets for COTS.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 data/download error, 2 usage error)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except (NpmError, EmojiDataError) as err:
        print(f"cots-data {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
