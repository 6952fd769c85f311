"""The online encoder's weights as a model leaves the trainer: which keys, which dtype, which checksum.

A Lightning checkpoint's state dict holds ``model.encoder.*`` (the online towers and projections: what
retrieval runs) next to the momentum copies, the queues, the heads and the filter. Only the first leave;
the CMVM ``[MASK]`` patch embedding stays behind too (training only: retrieval never masks a patch).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

ENCODER_PREFIX = "model.encoder."
TRAINING_ONLY_KEYS = ("image_tower.mask_embedding",)
# cots-export --dtype names -> torch dtypes (the names config.json records are torch's: float32, ...)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def encoder_state_dict(lightning_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online encoder's inference weights, keyed as ``TwoStreamEncoder.state_dict()``, from a checkpoint's
    ``state_dict`` (keys ``model.encoder.*``)."""
    state = {
        key[len(ENCODER_PREFIX) :]: value for key, value in lightning_state.items() if key.startswith(ENCODER_PREFIX)
    }
    for key in TRAINING_ONLY_KEYS:
        state.pop(key, None)
    return state


def cast_floating(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors in ``dtype`` (contiguous, detached, on the CPU); others unchanged."""
    return {
        key: (value.to(dtype) if value.is_floating_point() else value).detach().cpu().contiguous()
        for key, value in state.items()
    }


def weights_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a state dict as it is: for each key in sorted order, the key, dtype and shape, then the
    raw bytes (native byte order, little-endian on every platform torch ships for)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def model_checksum(state: Mapping[str, torch.Tensor]) -> str:
    """The model's identity: :func:`weights_checksum` of its float32 weights.

    A checkpoint and its exports in any dtype carry the same one (an export records its source's at export time;
    a float16 / bfloat16 copy cannot recompute it). Embeddings are equal only for equal checksum *and* dtype.
    """
    return weights_checksum(cast_floating(state, torch.float32))
