"""Retriever: a trained model's embeddings for images and captions, outside the trainer (``cots.load``).

The embeddings are those ``cots-eval`` scores, bit for bit for the same weights, dtype and batches: the
same image decoding (:func:`cots.data.images.load_rgb`), evaluation transform
(:func:`cots.data.images.build_eval_transform`), caption cleaning and tokenizer (the run's ``max_length``), and
tower code (:meth:`TwoStreamEncoder.encode_image` / ``encode_text``), in eval mode under
``torch.inference_mode()``. The score of an image and a caption is the dot product of their embeddings.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image

from cots.data.datasets import clean_caption
from cots.data.images import BadSample, build_eval_transform, load_rgb, to_rgb
from cots.data.text_tokenizer import TextTokenizer
from cots.model_source import LoadedModel, load_model

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
ImageItem = str | Path | Image.Image | torch.Tensor


class UnreadableImage(BadSample):
    """An image file that cannot be used (missing, not an image, truncated, oversized).

    ``path`` names the file; ``reason`` is the data layer's key (``missing_file``, ``undecodable``,
    ``too_large``), so that an index can catch, count and skip it.
    """

    def __init__(self, path: str | Path, reason: str, detail: str = "") -> None:
        Exception.__init__(self, f"cannot read image {path} ({reason})" + (f": {detail}" if detail else ""))
        self.reason = reason
        self.path = Path(path)


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class Retriever:
    """Embeds images and captions into the model's shared space; both ``(N, D)`` float32, L2-normalised, CPU.

    Build it with ``cots.load(path)`` (a training checkpoint or a ``cots-export`` folder).

    Attributes:
        embed_dim: D.
        device: where the towers run.
        model_id: a short human name, ``<task>-step<N>-<checksum[:8]>``.
        checksum: sha256 of the model's float32 encoder weights: the same from its checkpoint and from every
            export of it, whatever the dtype (see :func:`cots.encoder_weights.model_checksum`).
        dtype: the dtype the weights were stored in (``float32``, ``float16``, ``bfloat16``). The towers always
            hold them in float32 (an upcast, exact); embeddings are equal only for equal checksum and dtype.
        preprocess: the evaluation transform, RGB PIL image -> (3, H, W) float32.
        tokenizer: list of captions -> (input_ids, attention_mask), each (B, L) int64, L <= ``max_length``.
        image_size, max_length: H = W of the images; the caption length in tokens (longer ones are truncated).
        batch_size: the default batch of both encoders: the run's evaluation batch, so that a gallery in
            manifest order is encoded in the batches ``cots-eval`` uses.
        config: the export's config.json (architecture, provenance under ``metadata``).
        encoder: the :class:`TwoStreamEncoder` (float32, eval mode, on ``device``); ``source``: the path it came from.
    """

    def __init__(self, model: LoadedModel, device: str | torch.device = "cpu", autocast: str | None = None) -> None:
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, 'bf16' or 'fp16', got {autocast!r}")
        self.device = torch.device(device)
        self.encoder = model.encoder.to(self.device).eval()
        self.autocast = autocast
        self.config = model.config
        self.source = model.path
        self.model_id: str = model.config["model_id"]
        self.checksum: str = model.config["checksum"]
        self.dtype: str = model.config["dtype"]
        self.embed_dim: int = int(model.config["embed_dim"])
        self.image_size: int = int(model.config["image_size"])
        self.max_length: int = int(model.config["max_length"])
        self.batch_size: int = int(model.config["eval_batch_size"])
        self.tokenizer: TextTokenizer = model.tokenizer
        self.preprocess: Callable[[Image.Image], torch.Tensor] = build_eval_transform(self.image_size)

    def __repr__(self) -> str:
        return f"Retriever({self.model_id}, D={self.embed_dim}, {self.dtype}, device={self.device}, from {self.source})"

    # -- images ------------------------------------------------------------------------------------
    def prepare_image(self, item: ImageItem) -> torch.Tensor:
        """One image as the image tower takes it: (3, H, W) float32.

        Args:
            item: a path (decoded as the data layer does: transparency on white, decompression-bomb guard),
                an RGB or other-mode PIL image, or an already preprocessed (3, H, W) float tensor.
        Raises:
            UnreadableImage: a file that cannot be decoded (its path in the message and in ``.path``).
            TypeError, ValueError: anything else, or a tensor of the wrong shape.
        """
        if isinstance(item, (str, Path)):
            try:
                return self.preprocess(load_rgb(item))
            except BadSample as bad:
                detail = str(bad).removeprefix(f"{bad.reason}: ").removeprefix(f"{item}: ").removeprefix(str(item))
                raise UnreadableImage(item, bad.reason, detail) from None
        if isinstance(item, Image.Image):
            return self.preprocess(to_rgb(item))
        if isinstance(item, torch.Tensor):
            expected = (3, self.image_size, self.image_size)
            if tuple(item.shape) != expected or not item.is_floating_point():
                raise ValueError(
                    f"an image tensor must be preprocessed, {expected} floating point (retriever.preprocess(pil)); "
                    f"got {tuple(item.shape)} {item.dtype}"
                )
            return item.float()
        raise TypeError(f"an image is a path, a PIL image or a (3, H, W) tensor, not {type(item).__name__}")

    def encode_images(self, items: ImageItem | Iterable[ImageItem], batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of images: (N, D) float32 on the CPU, L2-normalised, in input order.

        Args:
            items: paths, PIL images and preprocessed (3, H, W) tensors, mixed freely (any iterable: read
                ``batch_size`` at a time), or one of them alone, or a (B, 3, H, W) tensor.
            batch_size: images per forward pass (default ``self.batch_size``).
        Raises:
            UnreadableImage: the first file that cannot be decoded. To skip and count bad files instead,
                call :meth:`prepare_image` on each item, catch ``UnreadableImage``, and pass the tensors.
        """
        if isinstance(items, torch.Tensor) and items.ndim == 4:
            items = list(items)
        elif isinstance(items, (str, Path, Image.Image, torch.Tensor)):
            items = [items]
        batches = (
            torch.stack([self.prepare_image(item) for item in chunk])
            for chunk in _chunks(items, batch_size or self.batch_size)
        )
        return self._encode(batches, lambda images: self.encoder.encode_image(images.to(self.device)))

    # -- captions ----------------------------------------------------------------------------------
    def encode_texts(self, texts: str | Iterable[str], batch_size: int | None = None) -> torch.Tensor:
        """Embeddings of captions: (N, D) float32 on the CPU, L2-normalised, in input order.

        White space is collapsed as in the data layer; a caption longer than ``max_length`` tokens is truncated.
        Each batch is padded to its longest caption, as in ``cots-eval``.

        Args:
            texts: strings (any iterable), or one string.
            batch_size: captions per forward pass (default ``self.batch_size``).
        """
        if isinstance(texts, str):
            texts = [texts]

        def tokenized(chunks: Iterator[list]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for chunk in chunks:
                bad = [type(text).__name__ for text in chunk if not isinstance(text, str)]
                if bad:
                    raise TypeError(f"captions must be strings, got {bad[0]}")
                yield self.tokenizer([clean_caption(text) for text in chunk])

        def encode(batch: tuple[torch.Tensor, torch.Tensor]):
            ids, mask = batch
            return self.encoder.encode_text(ids.to(self.device), mask.to(self.device))

        return self._encode(tokenized(_chunks(texts, batch_size or self.batch_size)), encode)

    # -- both --------------------------------------------------------------------------------------
    def _encode(self, batches: Iterable, forward: Callable) -> torch.Tensor:
        """Run ``forward`` (-> TowerOutput) on each batch in eval mode, without autograd: (N, D) float32 CPU."""
        outputs = []
        with torch.inference_mode(), self._autocast():
            for batch in batches:
                outputs.append(forward(batch).embedding.float().cpu())
        return torch.cat(outputs) if outputs else torch.zeros(0, self.embed_dim)

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[self.autocast])


def load(path: str | Path, device: str | torch.device = "cpu", autocast: str | None = None) -> Retriever:
    """A :class:`Retriever` from a training checkpoint (``.ckpt``) or a ``cots-export`` folder.

    Args:
        path: the checkpoint file, or the export folder (or its config.json).
        device: where the towers run (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        autocast: None (default: float32 computation, the embeddings ``cots-eval`` scores), or ``"bf16"`` /
            ``"fp16"``: mixed precision for speed (embeddings still returned in float32).
    Raises:
        FileNotFoundError, cots.checkpoints.CheckpointError, cots.export.ExportError: see
        :func:`cots.model_source.load_model`.
    """
    return Retriever(load_model(path), device, autocast)
