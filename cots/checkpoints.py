"""Reading checkpoints safely: no unpickling of arbitrary objects, clear errors for bad files."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch

from cots import distributed


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


# Names that changed since earlier checkpoints: state-dict key prefix, old -> new.
RENAMED_STATE_PREFIXES = {"objective.amf.": "amf."}  # the AMF left the objective for the training step


def upgrade_state_dict(state_dict: dict) -> dict:
    """Rename, in place, the keys of an older checkpoint's state dict to today's (and return it)."""
    for old, new in RENAMED_STATE_PREFIXES.items():
        for key in [k for k in state_dict if k.startswith(old)]:
            state_dict[new + key[len(old) :]] = state_dict.pop(key)
    return state_dict


def upgrade_run_config(config: dict) -> dict:
    """An older checkpoint's run config in today's keys (a copy): ``objective.image_tokenizer`` is gone (the
    CMVM targets read ``data.image_tokens`` themselves)."""
    config = {**config, "objective": dict(config.get("objective") or {})}
    config["objective"].pop("image_tokenizer", None)
    return config


def seed_rank_streams(seed: int, rank: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed + rank``: each rank draws its own dropout,
    drop-path and masking streams (as timm, BEiT and open_clip do), after every rank built the same model."""
    rank_seed = seed + rank
    random.seed(rank_seed)
    np.random.seed(rank_seed % 2**32)
    torch.manual_seed(rank_seed)


def capture_rank_rng_states() -> list[dict]:
    """Every rank's generator states in rank order (a collective: every rank must call it)."""
    return distributed.all_gather_object(capture_rng_state())


def restore_rank_rng_state(saved: list[dict] | dict) -> None:
    """This rank's generator states from a checkpoint's ``rng`` entry (one dict per rank, in rank order).

    A checkpoint from another world size cannot continue every rank's stream: each rank then takes
    the saved state of ``rank % saved ranks`` and mixes its rank into the torch seed, with a warning.
    (Checkpoints written before per-rank states hold one dict: rank 0's.)
    """
    states = saved if isinstance(saved, list) else [saved]
    rank, world = distributed.rank(), distributed.world_size()
    restore_rng_state(states[rank % len(states)])
    if len(states) != world:
        warnings.warn(
            f"the checkpoint holds random states of {len(states)} rank(s) but {world} are running: "
            "dropout and masking streams restart and the run is not an exact continuation",
            stacklevel=2,
        )
        if rank >= len(states):
            torch.manual_seed(torch.initial_seed() + rank)


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and this rank's CUDA device) generator states as tensors and plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device: one per rank
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: every device's state
            cuda = cuda[torch.cuda.current_device()] if torch.cuda.current_device() < len(cuda) else cuda[0]
        torch.cuda.set_rng_state(cuda)


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
