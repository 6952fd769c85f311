"""``cots-export CKPT OUT_DIR [--dtype fp32|fp16|bf16] [--onnx] [--force] [--retrieval JSON]``.

Writes a checkpoint's online encoder (towers and projections, no momentum copies, heads, queues or optimizer
state) as a folder that ``cots.load`` reads without the trainer; prints what it wrote with sizes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cots.checkpoints import CheckpointError
from cots.encoder_weights import DTYPES
from cots.export import ExportError
from cots.export.model_card import human_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cots-export",
        description="Export a COTS training checkpoint's encoder for retrieval (cots.load reads the folder).",
    )
    parser.add_argument("checkpoint", type=Path, help="a Lightning checkpoint written by cots-train (.ckpt)")
    parser.add_argument("out_dir", type=Path, help="the folder to write (created; must not hold files)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of model.safetensors")
    parser.add_argument("--onnx", action="store_true", help="also write image_encoder.onnx and text_encoder.onnx")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR when it is not empty")
    parser.add_argument(
        "--retrieval", type=Path, help="a retrieval.json (from cots-eval) to add to the model card's tables"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.checkpoint.is_file():
        print(f"cots-export: error: checkpoint not found: {args.checkpoint}", file=sys.stderr)
        return 2
    from cots.export.writer import export_checkpoint  # torch and the towers load after the arguments are checked

    try:
        files = export_checkpoint(args.checkpoint, args.out_dir, args.dtype, args.onnx, args.force, args.retrieval)
    except (CheckpointError, ExportError) as err:
        print(f"cots-export: error: {err}", file=sys.stderr)
        return 2
    source = args.checkpoint.stat().st_size
    total = sum(files.values())
    print(f"wrote {args.out_dir} ({args.dtype}) from {args.checkpoint} ({human_size(source)}):")
    for name, size in files.items():
        print(f"  {name:<24} {human_size(size):>10}")
    print(f"  {'total':<24} {human_size(total):>10}  ({100 * total / source:.1f}% of the checkpoint)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
