"""Writing an export folder from a training checkpoint, atomically: a hidden sibling folder renamed at the end."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from cots.data.images import eval_transform_spec
from cots.encoder_weights import DTYPES, cast_floating, weights_checksum
from cots.export import (
    CARD_FILE,
    CONFIG_FILE,
    FORMAT,
    PREPROCESS_FILE,
    TOKENIZER_FILE,
    WEIGHTS_FILE,
    ExportError,
)
from cots.export.model_card import model_card
from cots.model_source import load_checkpoint


def check_destination(out_dir: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder unless ``force`` (then it is replaced once the export is complete)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} exists and is not empty (--force replaces it)")


def given_evaluation(path: Path) -> dict:
    """A retrieval.json (from ``cots-eval``) to show in the model card."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ExportError(f"cannot read the retrieval table {path}: {err}") from err
    if not isinstance(table, dict) or "rsum" not in table:
        raise ExportError(f"{path} is not a retrieval table (cots-eval's retrieval.json)")
    return {"source": f"given to cots-export: {Path(path).name}", "table": table}


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an existing ``out_dir`` is removed only once ``tmp`` is in place."""
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    if out_dir.exists():
        out_dir.rename(old)
    try:
        tmp.rename(out_dir)
    except OSError:
        if old.exists():
            old.rename(out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    onnx: bool = False,
    force: bool = False,
    retrieval: str | Path | None = None,
) -> dict[str, int]:
    """Write the online encoder of ``checkpoint`` to ``out_dir`` (layout: :mod:`cots.export`).

    Args:
        dtype: ``fp32``, ``fp16`` or ``bf16``: the dtype of model.safetensors.
        onnx: also write the two ONNX graphs (float32, with the weights rounded to ``dtype``).
        force: replace a non-empty ``out_dir``.
        retrieval: a retrieval.json (e.g. from ``cots-eval``) to add to the model card's tables.
    Returns:
        file name -> size in bytes, of everything written.
    Raises:
        CheckpointError: the checkpoint is missing or unreadable. ExportError: the destination, or ONNX.
    """
    if dtype not in DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    out_dir = Path(out_dir).absolute()  # a name even for "."; the temporary folder is its sibling
    check_destination(out_dir, force)
    model = load_checkpoint(checkpoint)
    state = cast_floating(model.encoder.state_dict(), DTYPES[dtype])
    config = dict(
        model.config, dtype=str(DTYPES[dtype]).removeprefix("torch."), weights_checksum=weights_checksum(state)
    )
    if retrieval is not None:
        config["metadata"]["evaluations"].append(given_evaluation(Path(retrieval)))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "cots_format": FORMAT})
        _write_json(tmp / CONFIG_FILE, config)
        (tmp / TOKENIZER_FILE).write_text(model.tokenizer.to_str(), encoding="utf-8")
        _write_json(tmp / PREPROCESS_FILE, eval_transform_spec(config["image_size"]))
        if onnx:
            from cots.export.onnx_graphs import export_onnx  # onnxscript and the exporter load only when asked

            model.encoder.load_state_dict(state)  # the graphs hold the weights as exported (rounded to dtype)
            export_onnx(model.encoder, tmp, config["image_size"])
        files = {path.name: path.stat().st_size for path in sorted(tmp.iterdir())}
        (tmp / CARD_FILE).write_text(model_card(config, files), encoding="utf-8")
        files[CARD_FILE] = (tmp / CARD_FILE).stat().st_size
        for name in files:
            (tmp / name).chmod(0o644)  # safetensors writes 0600: an export is meant to be shared
        _replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return files
