"""dVAE weight files: safetensors with ``encoder.*`` / ``decoder.*`` keys + metadata.

Metadata (all strings, as safetensors requires):
    format      "cots-dvae"
    version     "1"
    arch        JSON of ``DVAEArch`` (so loading needs no config)
    input_size  pixels the model was trained at (optional; absent for converted weights)
    source      free text: "converted from ..." or "trained by cots-dvae train"
    train       JSON of training config and metrics (optional)

Reading uses ``safetensors`` only: nothing here ever unpickles.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .arch import DVAEArch, infer_encoder_arch

FORMAT = "cots-dvae"


@dataclass
class DVAEWeights:
    """Tensors and metadata of one file.

    Attributes:
        encoder: Encoder state dict (keys ``blocks.*``).
        decoder: Decoder state dict, or None when the file holds only an encoder.
        arch: architecture hyper-parameters.
        input_size: training resolution, if known.
        extra: remaining metadata strings (``source``, ``train``...).
    """

    encoder: dict[str, torch.Tensor]
    arch: DVAEArch
    decoder: dict[str, torch.Tensor] | None = None
    input_size: int | None = None
    extra: dict[str, str] = field(default_factory=dict)


def save_weights(path: str | Path, weights: DVAEWeights) -> Path:
    """Write ``weights`` as one safetensors file (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone().contiguous(): safetensors refuses shared or strided storage.
    tensors = {f"encoder.{k}": v.detach().cpu().clone().contiguous() for k, v in weights.encoder.items()}
    if weights.decoder is not None:
        tensors.update({f"decoder.{k}": v.detach().cpu().clone().contiguous() for k, v in weights.decoder.items()})
    meta = {"format": FORMAT, "version": "1", "arch": json.dumps(weights.arch.to_dict()), **weights.extra}
    if weights.input_size is not None:
        meta["input_size"] = str(weights.input_size)
    save_file(tensors, str(path), metadata=meta)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata strings of a safetensors file (empty dict if none)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from err


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> DVAEWeights:
    """Read a dVAE file written by ``save_weights``.

    Also accepts a bare Encoder state dict (keys ``blocks.*``, no metadata):
    the architecture is then inferred from tensor shapes.

    Args:
        path: ``.safetensors`` file.
        device: where tensors are loaded.
    """
    path = _existing(path)
    meta = read_metadata(path)
    tensors = load_file(str(path), device=str(device))
    encoder = _strip(tensors, "encoder.")
    decoder = _strip(tensors, "decoder.") or None
    if not encoder:
        if not any(k.startswith("blocks.") for k in tensors):
            raise ValueError(
                f"{path}: no 'encoder.*' or 'blocks.*' tensors; is this a dVAE file? (keys e.g. {sorted(tensors)[:3]})"
            )
        encoder = tensors  # bare dall_e Encoder state dict
    arch = DVAEArch.from_dict(json.loads(meta["arch"])) if "arch" in meta else infer_encoder_arch(encoder)
    input_size = int(meta["input_size"]) if "input_size" in meta else None
    extra = {k: v for k, v in meta.items() if k not in {"format", "version", "arch", "input_size"}}
    return DVAEWeights(encoder=encoder, arch=arch, decoder=decoder, input_size=input_size, extra=extra)


def _strip(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"dVAE weights not found: {path}. Create them with `cots-dvae convert --pkl encoder.pkl "
            f"--out {path}` (official DALL-E weights) or `cots-dvae train --manifest ... --out {path}`."
        )
    return path
