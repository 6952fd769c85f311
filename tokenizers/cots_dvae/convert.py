"""One-off, explicit conversion of the official pickled ``encoder.pkl`` to safetensors.

This is the ONLY place in the package that unpickles, and only when a user runs
``cots-dvae convert``. Everything else reads the safetensors output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from .arch import DVAEArch, build_encoder, infer_encoder_arch, load_strict
from .weights import DVAEWeights, save_weights

PICKLE_WARNING = (
    "WARNING: converting {path} unpickles it (torch.load(weights_only=False)), which can run "
    "arbitrary code. Only convert files you trust, e.g. the official "
    "https://cdn.openai.com/dall-e/encoder.pkl."
)


def convert_pickled_encoder(pkl: str | Path, out: str | Path) -> Path:
    """Unpickle a ``dall_e.Encoder`` (or its state dict) and save it as safetensors.

    The architecture (n_hid, n_blk_per_group, vocab_size, input_channels) is
    taken from the module's attributes, checked against the tensor shapes, and
    stored in the file's metadata so that loading needs no config.

    Args:
        pkl: pickled ``dall_e.Encoder`` module (official format) or state dict.
        out: destination ``.safetensors`` file.

    Returns:
        The written path.
    """
    pkl = Path(pkl)
    if not pkl.is_file():
        raise FileNotFoundError(f"pickle not found: {pkl} (download the official encoder.pkl first)")
    print(PICKLE_WARNING.format(path=pkl), file=sys.stderr)
    obj = torch.load(pkl, map_location="cpu", weights_only=False)  # the official file is a pickled module

    state = obj.state_dict() if isinstance(obj, torch.nn.Module) else obj
    if not isinstance(state, dict):
        raise TypeError(f"{pkl}: expected a dall_e Encoder or a state dict, got {type(obj).__name__}")
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    arch = infer_encoder_arch(state)
    if isinstance(obj, torch.nn.Module):
        declared = DVAEArch(
            **{
                k: int(getattr(obj, k, getattr(arch, k)))
                for k in ("n_hid", "n_blk_per_group", "vocab_size", "input_channels")
            }
        )
        if declared != arch:
            raise ValueError(f"{pkl}: module attributes {declared} disagree with tensor shapes {arch}")
    # Round-trip through a fresh module: catches a state dict of the wrong kind now,
    # not at training time.
    load_strict(build_encoder(arch), state, str(pkl))
    weights = DVAEWeights(
        encoder={k: v.float() for k, v in state.items()},
        arch=arch,
        extra={"source": f"converted from {pkl.name} by cots-dvae convert"},
    )
    return save_weights(out, weights)
