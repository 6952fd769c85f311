"""``model.init_from``: start a new run (fine-tuning) from the encoder of a checkpoint or an export folder.

Different from ``ckpt_path``, which resumes a run with everything it had. Here only weights move: the online
encoder (and, with ``model.init_heads=true``, the MVLM / ViLEM heads of a checkpoint) are loaded, the momentum
encoder is set to the same weights (a fresh EMA start), and everything else starts as a new run does: optimizer,
learning-rate schedule, feature queues and the AMF similarity queue (empty), the temperature (``model.temperature``:
an export holds none), step 0. The caption tokenizer is the source's, so that word ids mean what they meant.

A checkpoint is read with ``torch.load(weights_only=True)`` and an export folder as JSON + safetensors: nothing is
unpickled. The model must be built as the source was: a tensor of another shape, or a weight of the source that
the model lacks (or the reverse), is refused with the names and both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cots.checkpoints import read_checkpoint, upgrade_run_config, upgrade_state_dict
from cots.encoder_weights import ENCODER_PREFIX, TRAINING_ONLY_KEYS
from cots.export import CONFIG_FILE
from cots.export.config import run_data_settings
from cots.export.folder import read_export_config, read_export_tokenizer, read_export_weights
from cots.models.cots_model import COTSModel

HEAD_NAMES = ("cmvm_head", "cmlm_head", "vilem_head")  # COTSModel attributes outside the momentum-copied encoder
SHOWN = 12  # names listed per kind of mismatch


class InitFromError(ValueError):
    """A ``model.init_from`` source that does not fit the model; the message names the tensors."""


@dataclass
class InitSource:
    """Weights to start from. ``encoder``: keys of ``TwoStreamEncoder.state_dict()``; ``heads``: keys as
    ``COTSModel.state_dict()`` names them (``cmlm_head.…``), empty for an export."""

    path: Path
    kind: str  # "checkpoint" or "export"
    encoder: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor]
    tokenizer_json: str
    settings: dict  # image_size and max_length the source was trained with (shapes depend on them)
    step: int | None = None


@dataclass
class InitReport:
    """What :func:`initialize_from` did, for the console."""

    encoder_tensors: int
    heads: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)  # training-only tensors the source lacks

    def summary(self, source: InitSource) -> str:
        step = f", step {source.step}" if source.step is not None else ""
        lines = [
            f"init_from {source.path} ({source.kind}{step}): {self.encoder_tensors} encoder tensors into the online "
            "and the momentum encoder",
            f"  heads loaded: {', '.join(self.heads) or 'none'}",
        ]
        if self.left_at_init:
            lines.append(f"  not in the source, left at initialisation: {', '.join(self.left_at_init)}")
        lines.append("  fresh: optimizer, learning-rate schedule, feature queues, AMF queue, temperature, step 0")
        return "\n".join(lines)


def read_init_source(path: str | Path) -> InitSource:
    """A training checkpoint (``.ckpt``) or an export folder (or its config.json)."""
    path = Path(path)
    if path.is_file() and path.name == CONFIG_FILE:
        path = path.parent
    if path.is_dir():
        config = read_export_config(path)
        settings = {"image_size": int(config["image_size"]), "max_length": int(config["max_length"])}
        return InitSource(
            path, "export", read_export_weights(path, config), {}, read_export_tokenizer(path), settings,
            (config.get("metadata") or {}).get("global_step"),
        )  # fmt: skip
    if not path.is_file():
        raise FileNotFoundError(f"model.init_from: nothing at {path} (a COTS checkpoint or an export folder)")
    checkpoint = read_checkpoint(path)
    state = upgrade_state_dict(checkpoint["state_dict"])
    encoder = {k[len(ENCODER_PREFIX) :]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    heads = {k[len("model.") :]: v for k, v in state.items() if k.startswith(tuple(f"model.{h}." for h in HEAD_NAMES))}
    run_config = upgrade_run_config(checkpoint["cots"].get("config") or {})
    tokenizer = checkpoint["cots"].get("text_tokenizer")
    if not encoder or not tokenizer:
        raise InitFromError(f"model.init_from: {path} holds no encoder weights or no caption tokenizer")
    settings = {key: run_data_settings(run_config)[key] for key in ("image_size", "max_length")}
    return InitSource(path, "checkpoint", encoder, heads, tokenizer, settings, int(checkpoint.get("global_step", 0)))


def initialize_from(model: COTSModel, source: InitSource, heads: bool = False) -> InitReport:
    """Load ``source`` into ``model`` (online encoder, its momentum twin, optionally the heads); check first.

    Raises:
        InitFromError: shapes that differ, or weights only one side has (except the training-only ``[MASK]``
            patch embedding, which an export leaves out: it stays at initialisation), listed with both shapes.
    """
    target = model.encoder.state_dict()
    optional = set(TRAINING_ONLY_KEYS)
    _check_fit(target, source.encoder, source, "encoder", optional_in_source=optional, optional_in_model=optional)
    encoder_state = {k: v for k, v in source.encoder.items() if k in target}
    left = sorted(set(target) - set(encoder_state))
    loaded_heads: list[str] = []
    if heads:
        if source.kind == "export":
            raise InitFromError(f"model.init_heads=true: {source.path} is an export folder, which holds no heads")
        head_target = {
            f"{name}.{key}": value
            for name in HEAD_NAMES
            if getattr(model, name) is not None
            for key, value in getattr(model, name).state_dict().items()
        }
        built = {name for name in HEAD_NAMES if getattr(model, name) is not None}
        wanted = {k: v for k, v in source.heads.items() if k.split(".")[0] in built}
        _check_fit(head_target, wanted, source, "heads", optional_in_source=set(), optional_in_model=set())
        loaded_heads = sorted(built)
    with torch.no_grad():
        model.encoder.load_state_dict(encoder_state, strict=False)  # copies (and upcasts an fp16 export)
        _copy_module(model.encoder, model.momentum_encoder)
        for name in loaded_heads:
            prefix = f"{name}."
            getattr(model, name).load_state_dict(
                {k[len(prefix) :]: v for k, v in source.heads.items() if k.startswith(prefix)}
            )
    return InitReport(len(encoder_state), loaded_heads, [f"encoder.{k}" for k in left])


def _copy_module(online: nn.Module, momentum: nn.Module) -> None:
    """The momentum encoder := the online one, every parameter and buffer (the EMA restarts from here)."""
    momentum.load_state_dict(online.state_dict())


def _check_fit(
    target: dict[str, torch.Tensor],
    given: dict[str, torch.Tensor],
    source: InitSource,
    part: str,
    optional_in_source: set[str],
    optional_in_model: set[str],
) -> None:
    """Refuse shape mismatches, and names only one side has (beyond the optional ones), listing them all."""
    shapes = [
        f"{key}: source {tuple(given[key].shape)}, model {tuple(target[key].shape)}"
        for key in sorted(set(target) & set(given))
        if given[key].shape != target[key].shape
    ]
    missing = sorted(set(target) - set(given) - optional_in_model)  # the model has them, the source does not
    unexpected = sorted(set(given) - set(target) - optional_in_source)
    if not (shapes or missing or unexpected):
        return
    problems = []
    for title, names in (
        ("different shapes", shapes),
        ("in the model, not in the source", missing),
        ("in the source, not in the model", unexpected),
    ):
        if names:
            more = f" ... ({len(names) - SHOWN} more)" if len(names) > SHOWN else ""
            problems.append(f"{title} ({len(names)}): " + "; ".join(names[:SHOWN]) + more)
    hint = ""
    if part == "encoder" and source.settings:
        trained = ", ".join(f"{key} {value}" for key, value in source.settings.items())
        hint = (
            " | Build the model as the source was (model.encoder.*, and data.image_size / "
            f"data.text_tokenizer.max_length: the source has {trained})."
        )
    raise InitFromError(
        f"model.init_from: the {part} weights of {source.path} do not fit the model built here. "
        + " | ".join(problems)
        + hint
    )
