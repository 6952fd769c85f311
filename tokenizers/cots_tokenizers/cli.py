"""``cots-tokenizer``: convert official dVAE weights, train a dVAE, inspect a file."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from .train_dvae import TrainConfig

_TRAIN_DEFAULTS = TrainConfig()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cots-tokenizer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="pickled dall_e encoder.pkl -> safetensors (unpickles: trusted files only)")
    c.add_argument("--pkl", required=True, help="official encoder.pkl (a pickled dall_e.Encoder)")
    c.add_argument("--out", required=True, help="destination .safetensors, e.g. tokenizers/artifacts/dalle_encoder.safetensors")

    t = sub.add_parser("train", help="train a dall_e-architecture dVAE on a manifest's images")
    t.add_argument("--manifest", required=True, help="JSON/CSV image-text manifest")
    t.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the manifest's)")
    t.add_argument("--out", required=True, help="destination .safetensors (PNG and metrics JSON written beside it)")
    t.add_argument("--max-images", type=int, default=None, help="use only the first N manifest entries")
    t.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU training)")
    for f in fields(TrainConfig):
        default = getattr(_TRAIN_DEFAULTS, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            t.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        else:
            kind = float if f.name == "max_minutes" else type(default)
            t.add_argument(flag, type=kind, default=default, help=f"default {default}")

    i = sub.add_parser("info", help="print the metadata of a dVAE safetensors file")
    i.add_argument("path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        # Expected user errors (missing file, wrong state dict, bad option): one line, no traceback.
        print(f"cots-tokenizer {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from .convert import convert_pickled_encoder

        out = convert_pickled_encoder(args.pkl, args.out)
        print(f"wrote {out}")
    elif args.command == "train":
        from .train_dvae import train_from_manifest

        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        train_from_manifest(args.manifest, args.out, cfg, image_root=args.image_root, max_images=args.max_images)
    elif args.command == "info":
        from .weights import load_weights

        w = load_weights(args.path)
        n = sum(v.numel() for v in w.encoder.values())
        print(json.dumps({"arch": w.arch.to_dict(), "input_size": w.input_size, "encoder_params": n,
                          "has_decoder": w.decoder is not None, **w.extra}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
