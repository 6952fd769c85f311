"""config.json of a checkpoint: architecture, tokenizer and transform settings, identity and provenance.

``cots.load`` on a checkpoint builds this same dict (dtype float32), so a checkpoint and its exports report
the same ``model_id``, ``checksum`` and metadata.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from cots.encoder_spec import describe_encoder
from cots.export import FORMAT, FORMAT_VERSION
from cots.models.two_stream import TwoStreamEncoder

# The data module's defaults (cots.data.datamodule.ImageTextDataModule) for keys a run config may lack.
DEFAULT_IMAGE_SIZE, DEFAULT_MAX_LENGTH, DEFAULT_EVAL_BATCH_SIZE = 224, 64, 256
DATA_KEYS = ("train_manifest", "val_manifest", "test_manifest", "train_shards", "image_root", "pair_groups")
RUN_TABLE = "retrieval.json"  # written by cots-train next to checkpoints/ after its test


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def model_id(task_name: str | None, global_step: int, checksum: str) -> str:
    """A short human name: ``<task>-step<N>-<first 8 hex of the checksum>``, e.g. ``smoke-step150-3f2a9c1d``."""
    return f"{task_name or 'cots'}-step{global_step}-{checksum[:8]}"


def run_data_settings(run_config: dict) -> dict[str, int]:
    """``image_size``, ``max_length`` (of captions, in tokens) and ``eval_batch_size`` of a run's data config."""
    data = run_config.get("data") or {}
    return {
        "image_size": int(data.get("image_size", DEFAULT_IMAGE_SIZE)),
        "max_length": int((data.get("text_tokenizer") or {}).get("max_length", DEFAULT_MAX_LENGTH)),
        "eval_batch_size": int(data.get("eval_batch_size", DEFAULT_EVAL_BATCH_SIZE)),
    }


def checkpoint_evaluations(checkpoint_path: Path, checkpoint: dict, run_config: dict) -> list[dict]:
    """Retrieval tables known for these weights, oldest first: ``{"source", "split", "global_step", "table"}``.

    * the last gallery evaluation the module ran before saving (``cots.last_evaluation``; checkpoints written
      before it existed have none);
    * for ``last.ckpt``, the run folder's ``retrieval.json``: the table cots-train scores on the test split
      (val without one) after training, with the weights it ended with, which ``last.ckpt`` holds.
    """
    found = []
    stored = (checkpoint.get("cots") or {}).get("last_evaluation")
    if stored:
        found.append({"source": "last evaluation stored in the checkpoint", **stored})
    run_table = checkpoint_path.parent.parent / RUN_TABLE
    if checkpoint_path.name == "last.ckpt" and run_table.is_file():
        try:
            table = json.loads(run_table.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            table = None
        if isinstance(table, dict):
            split = "test" if (run_config.get("data") or {}).get("test_manifest") else "val"
            step = int(checkpoint.get("global_step", 0))
            found.append({"source": f"the run's {RUN_TABLE}", "split": split, "global_step": step, "table": table})
    return found


def run_metadata(checkpoint_path: Path, checkpoint: dict, run_config: dict) -> dict:
    """Where the weights come from: software versions, source checkpoint and step, data, seed, objective."""
    data = run_config.get("data") or {}
    objective = run_config.get("objective") or {}
    return {
        "software": {name: package_version(name) for name in ("cots", "torch", "timm", "transformers")},
        "source_checkpoint": checkpoint_path.name,
        "task_name": run_config.get("task_name"),
        "global_step": int(checkpoint.get("global_step", 0)),
        "epoch": int(checkpoint.get("epoch", 0)),
        "samples_seen": (checkpoint.get("cots") or {}).get("samples_seen"),
        "seed": run_config.get("seed"),
        "precision": (run_config.get("trainer") or {}).get("precision"),
        "data": {key: data.get(key) for key in DATA_KEYS},
        "objective": sorted(k for k, v in objective.items() if isinstance(v, dict) and v.get("enabled")),
        "evaluations": checkpoint_evaluations(checkpoint_path, checkpoint, run_config),
    }


def checkpoint_config(
    checkpoint_path: Path, checkpoint: dict, run_config: dict, encoder: TwoStreamEncoder, checksum: str
) -> dict:
    """config.json for a checkpoint's encoder in float32 (an export in another dtype replaces ``dtype`` and
    ``weights_checksum``). ``checksum``: :func:`cots.encoder_weights.model_checksum` of its weights."""
    metadata = run_metadata(checkpoint_path, checkpoint, run_config)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_id": model_id(metadata["task_name"], metadata["global_step"], checksum),
        "checksum": checksum,
        "dtype": "float32",
        "weights_checksum": checksum,
        **describe_encoder(encoder),
        **run_data_settings(run_config),
        "metadata": metadata,
    }
