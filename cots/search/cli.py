"""``cots-index MODEL SOURCE --out INDEX`` and ``cots-search INDEX "query" | --image PATH``.

Also ``python -m cots.search.cli index ...`` / ``python -m cots.search.cli search ...``. Both check their
arguments before importing torch; errors go to stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cots.export.model_card import human_size
from cots.search import SearchError


# -- cots-index --------------------------------------------------------------------------------------
def index_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cots-index",
        description="Embed the images of a folder or a manifest into a search index (or update the index there).",
    )
    parser.add_argument("model", type=Path, help="a cots-train checkpoint (.ckpt) or a cots-export folder")
    parser.add_argument("source", type=Path, help="a folder (recursive) or a manifest (.json / .csv)")
    parser.add_argument("--out", type=Path, required=True, help="the index folder (created, or updated)")
    parser.add_argument("--image-root", type=Path, help="for a manifest: the folder its paths are relative to")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="row storage")
    parser.add_argument("--hash", action="store_true", help="detect changed files by sha256, not size and mtime")
    parser.add_argument("--rebuild", action="store_true", help="encode every file again (another model or root)")
    parser.add_argument(
        "--faiss", choices=("hnsw", "ivf", "none"), help="also store an approximate FAISS index (none: drop it)"
    )
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the model's)")
    parser.add_argument("--device", default="cpu", help="where the image tower runs (cpu, cuda, ...)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (the summary is still printed)")
    return parser


def index_main(argv: list[str] | None = None) -> int:
    args = index_parser().parse_args(argv)
    if not args.model.exists():
        return _error("cots-index", f"no model at {args.model}")
    if not args.source.exists():
        return _error("cots-index", f"no folder or manifest at {args.source}")
    import cots  # torch and the towers load after the arguments are checked
    from cots.checkpoints import CheckpointError
    from cots.export import ExportError
    from cots.search.build import build_index

    try:
        model = cots.load(args.model, device=args.device)
        report = build_index(
            model,
            args.source,
            args.out,
            image_root=args.image_root,
            dtype=args.dtype,
            use_hash=args.hash,
            rebuild=args.rebuild,
            faiss=args.faiss,
            batch_size=args.batch_size,
            progress=not args.quiet,
        )
    except (SearchError, CheckpointError, ExportError, FileNotFoundError) as err:
        return _error("cots-index", str(err))
    print(summary(report))
    return 0


def summary(report) -> str:
    """What ``cots-index`` prints: the index, what was encoded, kept and removed, what was skipped."""
    info = report.info
    size = sum(f.stat().st_size for f in report.folder.iterdir() if f.is_file())
    rate = f" ({report.encoded / report.seconds:.0f} images/s)" if report.encoded and report.seconds > 0 else ""
    lines = [
        f"indexed {report.count} images of {info['root']} into {report.folder} ({info['dtype']}, {human_size(size)})",
        f"  model    {info['model']['model_id']}  (checksum {info['model']['checksum'][:16]}...)",
        f"  {report.mode + ':':<8} {report.encoded} encoded ({report.added} added, {report.changed} changed), "
        f"{report.unchanged} unchanged, {report.removed} removed in {report.seconds:.1f} s{rate}",
    ]
    skipped = sum(report.skipped.values())
    if skipped:
        reasons = ", ".join(f"{reason} {n}" for reason, n in report.skipped.items())
        lines.append(f"  skipped  {skipped}: {reasons}  (files listed in {info['files']['fingerprints']})")
    if report.other_files:
        lines.append(f"  ignored  {report.other_files} files that are not images by extension")
    if info.get("faiss"):
        lines.append(f"  faiss    {info['faiss']['factory']} {info['faiss']['search_params']}")
    return "\n".join(lines)


# -- cots-search -------------------------------------------------------------------------------------
def search_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cots-search", description="Search an index (cots-index) by a caption or by an image."
    )
    parser.add_argument("index", type=Path, help="the index folder")
    parser.add_argument("query", nargs="?", help='a caption, e.g. "a red heart" (or use --image)')
    parser.add_argument("--image", type=Path, help="search by this image instead of a caption")
    parser.add_argument("-k", type=int, default=10, help="results (default 10)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--model", type=Path, help="the model (default: the one the index records)")
    parser.add_argument("--backend", choices=("exact", "faiss"), default="exact", help="exact (default) or faiss")
    parser.add_argument("--device", default="cpu", help="where the towers run")
    return parser


def search_main(argv: list[str] | None = None) -> int:
    parser = search_parser()
    args = parser.parse_args(argv)
    if (args.query is None) == (args.image is None):
        parser.error("give a caption or --image PATH (one of them)")
    if args.k < 1:
        parser.error("-k must be at least 1")
    from cots.checkpoints import CheckpointError
    from cots.export import ExportError
    from cots.retriever import UnreadableImage
    from cots.search.searcher import Searcher

    try:
        searcher = Searcher(args.index, model=args.model, backend=args.backend, device=args.device)
        started = time.perf_counter()
        hits = searcher.text(args.query, args.k) if args.image is None else searcher.image(args.image, args.k)
        seconds = time.perf_counter() - started
    except (SearchError, CheckpointError, ExportError, UnreadableImage, FileNotFoundError) as err:
        return _error("cots-search", str(err))
    index = searcher.index
    query = {"text": args.query} if args.image is None else {"image": str(args.image)}
    if args.json:
        result = {
            "query": query,
            "k": args.k,
            "index": str(index.folder),
            "root": str(index.root),
            "count": index.count,
            "model_id": index.model_id,
            "backend": args.backend,
            "seconds": round(seconds, 6),
            "hits": [
                {"rank": rank, **hit.as_dict(), "file": str(index.resolve(hit.id))} for rank, hit in enumerate(hits, 1)
            ],
        }
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    what = json.dumps(args.query, ensure_ascii=False) if args.image is None else f"image {args.image}"
    print(
        f"{what}: top {len(hits)} of {index.count} images under {index.root} "
        f"({index.model_id}, {args.backend}, {1000 * seconds:.0f} ms)"
    )
    for rank, hit in enumerate(hits, 1):
        print(f"{rank:>4}  {hit.score:.4f}  {hit.path}")
    return 0


def _error(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """``python -m cots.search.cli index|search ...``"""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"index": index_main, "search": search_main}
    if not argv or argv[0] not in commands:
        print("usage: python -m cots.search.cli {index,search} ... (see --help of each)", file=sys.stderr)
        return 2
    return commands[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
