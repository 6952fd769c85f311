"""Unpack what ``bench/gpu_pack.py`` packed: ``.gpu/emoji.tar.gz`` into the emoji set the configs read, and
``.gpu/minilm`` into a half-precision checkpoint that ``from_pretrained`` reads (the int8 word embeddings
times their scales).

    python bench/gpu_unpack.py .gpu data /tmp/minilm      # -> data/emoji/{*.json,images/<vendor>/*.png}, /tmp/minilm
"""

from __future__ import annotations

import argparse
import shutil
import tarfile
from pathlib import Path

from safetensors.torch import load_file, save_file


def unpack_emoji(archive: Path, data_dir: Path) -> int:
    """The plain files of the archive under ``data_dir`` (nothing outside it); returns the images written."""
    images = 0
    root = data_dir.resolve()
    with tarfile.open(archive) as tar:
        for member in tar:
            target = (data_dir / member.name).resolve()
            if member.isfile() and root in target.parents:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                images += target.suffix == ".png"
    return images


def copy_all_but_weights(source: Path, out: Path) -> None:
    """A model folder's config, tokenizer and other small files (everything but ``model.safetensors``)."""
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "model.safetensors":
            shutil.copy2(path, out / path.name)


def unpack_minilm(packed: Path, out: Path) -> None:
    """A loadable model folder: the packed files, the ``<name>.int8`` / ``<name>.scale`` pairs as fp16 ``<name>``."""
    copy_all_but_weights(packed, out)
    weights = load_file(packed / "model.safetensors")
    for name in [n for n in weights if n.endswith(".int8")]:
        base = name[: -len(".int8")]
        weights[base] = (weights.pop(name).float() * weights.pop(f"{base}.scale").float()).half()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pack", type=Path, help="the folder gpu_pack.py wrote (.gpu)")
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("minilm_dir", type=Path)
    args = parser.parse_args()
    print(f"{unpack_emoji(args.pack / 'emoji.tar.gz', args.data_dir)} images into {args.data_dir}")
    unpack_minilm(args.pack / "minilm", args.minilm_dir)
    print(f"MiniLM into {args.minilm_dir}")


if __name__ == "__main__":
    main()
