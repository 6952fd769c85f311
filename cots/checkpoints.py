"""Reading checkpoints safely: no unpickling of arbitrary objects, clear errors for bad files."""
from __future__ import annotations

from pathlib import Path

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
