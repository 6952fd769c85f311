"""The export folder: a trained model's online encoder outside the trainer (``cots-export``, ``cots.load``).

Layout (every name fixed)::

    config.json         the towers' architecture, tokenizer settings, checksum, dtype, provenance (no Hydra)
    model.safetensors   the online encoder's weights (image tower, text tower, projections) in the export dtype
    tokenizer.json      the caption tokenizer (Hugging Face ``tokenizers`` JSON)
    preprocess.json     the evaluation transform, as plain data (for runtimes other than this package)
    README.md           the model card
    image_encoder.onnx  with --onnx: (B, 3, H, W) float32 -> (B, D) L2-normalised
    text_encoder.onnx   with --onnx: input_ids, attention_mask (B, L) int64 -> (B, D) L2-normalised

Only this module's constants and exception are imported with the package: the rest is torch-heavy.
"""

from __future__ import annotations

FORMAT = "cots-two-stream-encoder"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PREPROCESS_FILE = "preprocess.json"
CARD_FILE = "README.md"
IMAGE_ONNX_FILE = "image_encoder.onnx"
TEXT_ONNX_FILE = "text_encoder.onnx"
REQUIRED_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, PREPROCESS_FILE)


class ExportError(RuntimeError):
    """An export folder that is missing, incomplete, corrupt or of another format, or an export that cannot be
    written (an existing folder without ``force``); the message names the file."""
