"""``cots-dvae``: convert official dVAE weights, train a dVAE, cache a manifest's tokens, inspect a file.

It lives in ``cots.prepare`` and not in ``cots_dvae`` because it reads manifests and writes token
caches (``cots.data``, ``cots.prepare``); ``cots_dvae`` itself takes image paths and imports
nothing from ``cots``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields

import torch

from cots_dvae.arch import DOWNSAMPLE
from cots_dvae.train_dvae import TrainConfig

_TRAIN_DEFAULTS = TrainConfig()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cots-dvae", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("convert", help="pickled dall_e encoder.pkl -> safetensors (unpickles: trusted files only)")
    c.add_argument("--pkl", required=True, help="official encoder.pkl (a pickled dall_e.Encoder)")
    c.add_argument(
        "--out", required=True, help="destination .safetensors, e.g. tokenizers/artifacts/dalle_encoder.safetensors"
    )

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

    k = sub.add_parser("cache", help="precompute a manifest's dVAE token grids into a memory-mapped token cache")
    k.add_argument("--manifest", required=True, help="JSON/CSV manifest; cache row i = manifest entry i")
    k.add_argument("--weights", required=True, help="dVAE .safetensors (convert or train output)")
    k.add_argument("--image-size", type=int, required=True, help="ViT input side in px (data.image_size)")
    k.add_argument(
        "--out", required=True, help="tokens file, e.g. data/coco/train_tokens.npy (.boxes.npy and .json beside it)"
    )
    k.add_argument(
        "--patch-size",
        type=int,
        default=None,
        help=f"ViT patch side: the dVAE size is then image_size / patch_size * {DOWNSAMPLE}",
    )
    k.add_argument(
        "--dvae-size",
        type=int,
        default=None,
        help="dVAE input side in px (default: from --patch-size, else the file's)",
    )
    k.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the manifest's)")
    k.add_argument("--crops", type=int, default=0, help="k random resized crops per image besides the centre crop")
    k.add_argument(
        "--crop-scale", type=float, nargs=2, default=(0.5, 1.0), help="area fraction range of the random crops"
    )
    k.add_argument(
        "--crop-ratio", type=float, nargs=2, default=(3 / 4, 4 / 3), help="aspect (w/h) range of the random crops"
    )
    k.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    k.add_argument("--batch-size", type=int, default=64)
    k.add_argument("--workers", type=int, default=0, help="image decoding workers")
    k.add_argument("--device", default="cpu", help="where the dVAE runs (cpu, cuda)")
    k.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")

    i = sub.add_parser("info", help="print the metadata of a dVAE safetensors file")
    i.add_argument("path")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError) as err:
        # Expected user errors (missing file, wrong state dict, bad option): one line, no traceback.
        print(f"cots-dvae {args.command}: error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "convert":
        from cots_dvae.convert import convert_pickled_encoder

        out = convert_pickled_encoder(args.pkl, args.out)
        print(f"wrote {out}")
    elif args.command == "train":
        from cots.data.manifest import load_manifest
        from cots_dvae.train_dvae import train_from_paths

        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
        entries = load_manifest(args.manifest, image_root=args.image_root)[: args.max_images]
        train_from_paths([entry.image for entry in entries], args.out, cfg, source=args.manifest)
    elif args.command == "cache":
        _cache(args)
    elif args.command == "info":
        from cots_dvae.weights import load_weights

        w = load_weights(args.path)
        n = sum(v.numel() for v in w.encoder.values())
        print(
            json.dumps(
                {
                    "arch": w.arch.to_dict(),
                    "input_size": w.input_size,
                    "encoder_params": n,
                    "has_decoder": w.decoder is not None,
                    **w.extra,
                },
                indent=2,
            )
        )
    return 0


def _cache(args: argparse.Namespace) -> None:
    from cots.geometry import check_grid
    from cots.prepare.token_cache_builder import build_token_cache
    from cots_dvae import DalleTokenizer, dvae_input_size

    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.dvae_size
    if size is None and args.patch_size:
        size = dvae_input_size(args.image_size, args.patch_size)
    dvae = DalleTokenizer(args.weights, input_size=size)
    if args.patch_size:
        check_grid(
            args.image_size,
            args.patch_size,
            dvae.input_size,
            dvae.downsample,
            keys=("--image-size", "--patch-size", "--dvae-size"),
        )
    out = build_token_cache(
        args.manifest,
        dvae,
        args.out,
        args.image_size,
        image_root=args.image_root,
        crops=args.crops,
        scale=tuple(args.crop_scale),
        ratio=tuple(args.crop_ratio),
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        weights=args.weights,
    )
    print(f"wrote {out} ({dvae.grid_size()}x{dvae.grid_size()} tokens, 1 + {args.crops} crops per image)")


if __name__ == "__main__":
    sys.exit(main())
