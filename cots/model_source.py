"""A trained model's online encoder and caption tokenizer, read from a training checkpoint or an export folder.

Both give the same :class:`LoadedModel`: the towers in float32 with the weights loaded, the tokenizer with the
run's caption length, and config.json's dict (a checkpoint's is built as ``cots-export`` would write it).
A checkpoint is read with ``torch.load(weights_only=True)``; an export folder with safetensors and JSON only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cots.checkpoints import CheckpointError, read_checkpoint, upgrade_run_config, upgrade_state_dict
from cots.data.text_tokenizer import TextTokenizer
from cots.encoder_spec import build_encoder, encoder_from_run_config
from cots.encoder_weights import encoder_state_dict, model_checksum
from cots.export import CONFIG_FILE, ExportError
from cots.export.config import checkpoint_config, run_data_settings
from cots.export.folder import read_export_config, read_export_tokenizer, read_export_weights
from cots.models.two_stream import TwoStreamEncoder


@dataclass
class LoadedModel:
    """What retrieval needs from a trained model."""

    encoder: TwoStreamEncoder  # float32 weights (an fp16 / bf16 export's upcast, exactly), eval mode, CPU
    tokenizer: TextTokenizer  # truncating at config["max_length"]
    config: dict  # config.json's content (cots.export.config.checkpoint_config for a checkpoint)
    path: Path  # the checkpoint file or the export folder


def load_model(path: str | Path) -> LoadedModel:
    """A checkpoint file (``.ckpt``) or an export folder (or its ``config.json``).

    Raises:
        FileNotFoundError: nothing at ``path``.
        CheckpointError: a file that is not a readable COTS checkpoint.
        ExportError: a folder that is not a complete, intact export.
    """
    path = Path(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    if path.is_dir():
        return load_export(path)
    if path.is_file():
        return load_checkpoint(path)
    raise FileNotFoundError(f"no model at {path}: expected a COTS checkpoint (.ckpt) or an export folder (cots-export)")


def _load_weights(encoder: TwoStreamEncoder, state: dict[str, torch.Tensor], error, where: Path) -> None:
    try:
        encoder.load_state_dict(state)  # strict; copies (and upcasts) into the float32 parameters
    except RuntimeError as err:
        raise error(f"the weights of {where} do not fit the towers they describe: {err}") from err


def load_checkpoint(path: str | Path) -> LoadedModel:
    """The online encoder of a Lightning checkpoint, built as its run built it (see ``encoder_from_run_config``)."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    section = checkpoint["cots"]
    run_config = upgrade_run_config(section.get("config") or {})
    encoder_config = (run_config.get("model") or {}).get("encoder")
    if not encoder_config or not section.get("text_tokenizer"):
        raise CheckpointError(f"{path} holds no run config (model.encoder) or no caption tokenizer")
    max_length = run_data_settings(run_config)["max_length"]
    tokenizer = TextTokenizer.from_str(section["text_tokenizer"], max_length)
    try:
        encoder = encoder_from_run_config(encoder_config, tokenizer.vocab_size)
    except (ValueError, FileNotFoundError) as err:
        raise CheckpointError(f"cannot rebuild the towers of {path}: {err}") from err
    _load_weights(encoder, encoder_state_dict(upgrade_state_dict(checkpoint["state_dict"])), CheckpointError, path)
    config = checkpoint_config(path, checkpoint, run_config, encoder, model_checksum(encoder.state_dict()))
    return LoadedModel(encoder, tokenizer, config, path)


def load_export(folder: str | Path) -> LoadedModel:
    """An export folder: towers from config.json (no Hydra, nothing downloaded), weights from model.safetensors
    (checked against config.json's ``weights_checksum``), the tokenizer from tokenizer.json."""
    folder = Path(folder)
    config = read_export_config(folder)
    state = read_export_weights(folder, config)
    try:
        encoder = build_encoder(config)
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(f"cannot build the towers {folder / CONFIG_FILE} describes: {err!r}") from err
    _load_weights(encoder, state, ExportError, folder)
    tokenizer = TextTokenizer.from_str(read_export_tokenizer(folder), int(config["max_length"]))
    return LoadedModel(encoder, tokenizer, config, folder)
