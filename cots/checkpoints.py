"""Reading checkpoints safely: no unpickling of arbitrary objects, clear errors for bad files."""
from __future__ import annotations

from pathlib import Path

import random

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated or not a COTS checkpoint; the message names the file."""


def read_checkpoint(path: str | Path) -> dict:
    """Load a Lightning checkpoint with ``weights_only=True`` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {err}") from err
    if "cots" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a COTS checkpoint (no 'cots' section)")
    return checkpoint


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
