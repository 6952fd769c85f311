"""Reading an export folder back: its config, weights and tokenizer, checked. Nothing is unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cots.data.images import eval_transform_spec
from cots.encoder_weights import weights_checksum
from cots.export import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    PREPROCESS_FILE,
    REQUIRED_FILES,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ExportError,
)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read {path}: {err}") from err


def read_export_config(folder: Path) -> dict:
    """config.json of an export folder, checked for its format and version, and the folder for its files."""
    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ExportError(f"{folder} is not a complete COTS export: missing {', '.join(missing)}")
    config = read_json(folder / CONFIG_FILE)
    if config.get("format") != FORMAT:
        raise ExportError(f"{folder / CONFIG_FILE} is not a COTS export config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{folder / CONFIG_FILE} has format_version {config.get('format_version')!r}; "
            f"this version of cots reads {FORMAT_VERSION}"
        )
    preprocess = read_json(folder / PREPROCESS_FILE)
    if preprocess != eval_transform_spec(config["image_size"]):
        raise ExportError(f"{folder / PREPROCESS_FILE} describes a transform this version of cots does not implement")
    return config


def read_export_weights(folder: Path, config: dict) -> dict[str, torch.Tensor]:
    """model.safetensors as stored (the export dtype), checked against config.json's ``weights_checksum``."""
    path = Path(folder) / WEIGHTS_FILE
    try:
        state = load_file(path, device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise ExportError(f"cannot read {path} (truncated or corrupt?): {err}") from err
    if weights_checksum(state) != config.get("weights_checksum"):
        raise ExportError(f"{path} does not match the weights_checksum of {CONFIG_FILE} (modified or corrupt)")
    return state


def read_export_tokenizer(folder: Path) -> str:
    path = Path(folder) / TOKENIZER_FILE
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ExportError(f"cannot read {path}: {err}") from err
