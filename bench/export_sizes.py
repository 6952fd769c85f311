"""Sizes of a checkpoint against its cots-export folders, per dtype, with and without ONNX.

    python bench/export_sizes.py logs/smoke/<run>/checkpoints/last.ckpt [more.ckpt ...] [--out table.md]

Each checkpoint is exported in fp32, fp16 and bf16, with and without --onnx, into a temporary folder;
prints one markdown table row per (checkpoint, dtype, ONNX): the checkpoint's size, model.safetensors,
the ONNX graphs, the whole folder and its share of the checkpoint (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from cots.export.writer import export_checkpoint

HEADER = (
    "| checkpoint | ckpt MB | dtype | onnx | model.safetensors MB | onnx graphs MB | folder MB | folder / ckpt |\n"
    "|---|---:|---|---|---:|---:|---:|---:|"
)


def rows(checkpoint: Path) -> list[str]:
    size = checkpoint.stat().st_size
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for onnx in (False, True):
            for dtype in ("fp32", "fp16", "bf16"):
                files = export_checkpoint(checkpoint, Path(tmp) / f"{dtype}-{onnx}", dtype=dtype, onnx=onnx)
                graphs = sum(v for k, v in files.items() if ".onnx" in k)
                total = sum(files.values())
                out.append(
                    f"| `{checkpoint.parents[2].name}/{checkpoint.name}` | {size / 1e6:.1f} | {dtype} | "
                    f"{'yes' if onnx else 'no'} | {files['model.safetensors'] / 1e6:.2f} | {graphs / 1e6:.2f} | "
                    f"{total / 1e6:.2f} | {100 * total / size:.1f}% |"
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    table = "\n".join([HEADER, *(row for checkpoint in args.checkpoints for row in rows(checkpoint))])
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
