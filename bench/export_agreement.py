"""Does a model leave the trainer intact? cots-eval on a checkpoint against cots.load on the checkpoint and on its
exports (fp32 with ONNX, fp16, bf16), gallery by gallery, and the ONNX towers against PyTorch.

    python bench/export_agreement.py CKPT MANIFEST [MANIFEST ...] [--out bench/results/export_agreement.md]

For each test manifest (e.g. the emoji demo's ``data/emoji/test_google.json`` and ``test_twitter.json``):

* ``cots-eval ckpt_path=CKPT data.test_manifest=MANIFEST`` (a subprocess, the command a user runs) writes its
  ``retrieval.json``: the reference table;
* ``cots.load(source)`` for the checkpoint and each export encodes the gallery's images (paths, in manifest order)
  and captions; its Recall@K table is compared with the reference (``==`` on every figure) and the largest
  difference of its embeddings from the checkpoint's is reported;
* the ONNX graphs of the fp32 export run in onnxruntime (CPU) on the same preprocessed images and tokenized
  captions; their largest difference from PyTorch and their own table are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cots  # noqa: E402
from cots.data.datasets import GalleryCaptions  # noqa: E402
from cots.data.manifest import load_manifest  # noqa: E402
from cots.export.cli import main as cots_export  # noqa: E402
from cots.metrics.retrieval import retrieval_metrics  # noqa: E402

FIGURES = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def cots_eval_table(checkpoint: Path, manifest: Path, run_dir: Path) -> dict[str, float]:
    """The table ``cots-eval`` writes for one test manifest."""
    command = [
        sys.executable,
        "-m",
        "cots.evaluate",
        f"ckpt_path={checkpoint}",
        f"data.test_manifest={manifest}",
        f"hydra.run.dir={run_dir}",
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads((run_dir / "retrieval.json").read_text())


def gallery(checkpoint: Path, manifest: Path) -> tuple[list[Path], GalleryCaptions]:
    """The manifest's images (paths, in order) and captions, read as the checkpoint's data config reads them."""
    from cots.checkpoints import read_checkpoint

    image_root = read_checkpoint(checkpoint)["cots"]["config"]["data"].get("image_root")
    entries = load_manifest(str(manifest), image_root)
    return [entry.image for entry in entries], GalleryCaptions(entries)


def onnx_embeddings(folder: Path, model, paths: list[Path], captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Both ONNX towers on the gallery, batch by batch as the Retriever encodes it: (N, D) and (M, D) float32."""
    import onnxruntime as ort

    options = {"providers": ["CPUExecutionProvider"]}
    image_graph = ort.InferenceSession(str(folder / "image_encoder.onnx"), **options)
    text_graph = ort.InferenceSession(str(folder / "text_encoder.onnx"), **options)
    size = model.batch_size
    images, texts = [], []
    for start in range(0, len(paths), size):
        batch = torch.stack([model.prepare_image(p) for p in paths[start : start + size]])
        images.append(torch.from_numpy(image_graph.run(None, {"images": batch.numpy()})[0]))
    for start in range(0, len(captions), size):
        input_ids, attention_mask = model.tokenizer(captions[start : start + size])
        feed = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()}
        texts.append(torch.from_numpy(text_graph.run(None, feed)[0]))
    return torch.cat(images), torch.cat(texts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("manifests", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "export_agreement.md")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows, notes = [], []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        exports = {"fp32 + ONNX": scratch / "fp32", "fp16": scratch / "fp16", "bf16": scratch / "bf16"}
        assert cots_export([str(args.checkpoint), str(exports["fp32 + ONNX"]), "--onnx"]) == 0
        for dtype in ("fp16", "bf16"):
            assert cots_export([str(args.checkpoint), str(exports[dtype]), "--dtype", dtype]) == 0
        sources = {"checkpoint": args.checkpoint, **exports}
        models = {name: cots.load(path) for name, path in sources.items()}
        for manifest in args.manifests:
            reference = cots_eval_table(args.checkpoint, manifest.resolve(), scratch / f"eval_{manifest.stem}")
            rows.append((manifest.name, "`cots-eval` on the checkpoint", reference, "reference", "–"))
            paths, captions = gallery(args.checkpoint, manifest)
            text_to_image = torch.tensor(captions.text_to_image)
            base = None
            for name, model in models.items():
                images, texts = model.encode_images(paths), model.encode_texts(captions.captions)
                base = (images, texts) if base is None else base
                diff = max((images - base[0]).abs().max().item(), (texts - base[1]).abs().max().item())
                table = retrieval_metrics(images, texts, text_to_image)
                same = "identical" if table == reference else "differs"
                rows.append((manifest.name, f"`cots.load` {name}", table, same, f"{diff:.1e}"))
            onnx_images, onnx_texts = onnx_embeddings(
                exports["fp32 + ONNX"], models["checkpoint"], paths, captions.captions
            )
            diff = max((onnx_images - base[0]).abs().max().item(), (onnx_texts - base[1]).abs().max().item())
            table = retrieval_metrics(onnx_images, onnx_texts, text_to_image)
            same = "identical" if table == reference else "differs"
            rows.append((manifest.name, "ONNX towers (onnxruntime CPU)", table, same, f"{diff:.1e}"))
            notes.append(f"{manifest.name}: {len(paths)} images, {len(captions.captions)} captions")
    header = "| gallery | scored by | " + " | ".join(FIGURES) + " | table vs cots-eval | max abs diff vs ckpt |"
    lines = [header, "|" + "---|" * (len(FIGURES) + 4)]
    for gallery_name, source, table, same, diff in rows:
        figures = " | ".join(f"{table[k]:.2f}" for k in FIGURES)
        lines.append(f"| {gallery_name} | {source} | {figures} | {same} | {diff} |")
    report = "\n".join(
        [
            "# Checkpoint, exports and ONNX score the same galleries (`bench/export_agreement.py`, issue #17)",
            "",
            f"`python bench/export_agreement.py {args.checkpoint} {' '.join(str(m) for m in args.manifests)}`",
            "",
            f"Galleries: {'; '.join(notes)}. Embedding differences are the largest absolute difference of any",
            "coordinate from the checkpoint's own `cots.load` embeddings (L2-normalised, float32). Measured on "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s.",
            "",
            *lines,
            "",
        ]
    )
    print(report)
    args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
