"""ONNX graphs of the two towers (``cots-export --onnx``): each one input batch -> (B, D) L2-normalised float32.

``image_encoder.onnx``: ``images`` (B, 3, H, W) float32, preprocessed as preprocess.json says -> ``embeddings``.
``text_encoder.onnx``: ``input_ids``, ``attention_mask`` (B, L) int64 from tokenizer.json -> ``embeddings``.
B and L are dynamic (L up to the text tower's position embeddings). Exported with ``torch.onnx.export``'s
torch.export-based exporter (opset 18; needs ``onnxscript``: ``pip install -e .[export]``), always in float32:
an fp16 / bf16 export's graphs hold its rounded weights, upcast, which is what onnxruntime's CPU kernels run.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from cots.export import IMAGE_ONNX_FILE, TEXT_ONNX_FILE, ExportError
from cots.models.two_stream import TwoStreamEncoder

OPSET = 18
# Above this, a graph's weights go to a side file (<name>.onnx.data): one protobuf holds at most 2 GiB.
EXTERNAL_DATA_BYTES = 1_500_000_000


class ImageEncoderGraph(nn.Module):
    """images (B, 3, H, W) float32 -> embeddings (B, D): ``TwoStreamEncoder.encode_image(...).embedding``."""

    def __init__(self, encoder: TwoStreamEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_image(images).embedding


class TextEncoderGraph(nn.Module):
    """input_ids, attention_mask (B, L) int64 -> embeddings (B, D): ``encode_text(...).embedding``."""

    def __init__(self, encoder: TwoStreamEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder.encode_text(input_ids, attention_mask).embedding


def _export(graph: nn.Module, inputs: tuple, names: list[str], dynamic: dict, path: Path) -> None:
    size = sum(p.numel() * p.element_size() for p in graph.parameters())
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on dynamic shapes and deprecations
        try:
            torch.onnx.export(
                graph,
                inputs,
                str(path),
                input_names=names,
                output_names=["embeddings"],
                dynamic_shapes=dynamic,
                opset_version=OPSET,
                dynamo=True,
                external_data=size > EXTERNAL_DATA_BYTES,
                verbose=False,
            )
        except Exception as err:  # noqa: BLE001 - the exporter raises many kinds; say which graph failed
            raise ExportError(f"the ONNX export of {path.name} failed: {err}\n{log.getvalue()[-2000:]}") from err


def export_onnx(encoder: TwoStreamEncoder, folder: Path, image_size: int) -> list[Path]:
    """Write both graphs of a float32 encoder into ``folder``; returns the files written."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it; say so before tracing anything)
    except ImportError as err:
        raise ExportError(
            "--onnx needs the onnx, onnxscript and onnxruntime packages: pip install -e '.[export]'"
        ) from err
    encoder = encoder.float().eval()
    batch = torch.export.Dim("batch", min=1, max=65536)
    max_positions = int(encoder.text_tower.bert.config.max_position_embeddings)
    length = torch.export.Dim("length", min=1, max=max_positions)
    example_length = max(2, min(8, max_positions))
    images = torch.zeros(2, 3, image_size, image_size)
    input_ids = torch.ones(2, example_length, dtype=torch.long)
    attention_mask = torch.ones(2, example_length, dtype=torch.long)
    folder = Path(folder)
    with torch.no_grad():
        _export(ImageEncoderGraph(encoder), (images,), ["images"], {"images": {0: batch}}, folder / IMAGE_ONNX_FILE)
        _export(
            TextEncoderGraph(encoder),
            (input_ids, attention_mask),
            ["input_ids", "attention_mask"],
            {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
            folder / TEXT_ONNX_FILE,
        )
    names = (IMAGE_ONNX_FILE, TEXT_ONNX_FILE)
    return [path for name in names for path in (folder / name, folder / f"{name}.data") if path.is_file()]
