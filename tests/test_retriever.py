"""``cots.load`` on a training checkpoint: what encode_images / encode_texts accept, return and refuse."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from PIL import Image

import cots
from cots.checkpoints import CheckpointError, read_checkpoint
from cots.data.datasets import GalleryCaptions
from cots.data.images import load_rgb
from cots.data.manifest import load_manifest
from cots.retriever import Retriever, UnreadableImage


@pytest.fixture(scope="module")
def retriever(tiny_run) -> Retriever:
    return cots.load(tiny_run / "checkpoints" / "last.ckpt")


@pytest.fixture(scope="module")
def gallery(tiny_run):
    """The test gallery of the tiny run: its entries (absolute image paths) and captions."""
    data = read_checkpoint(tiny_run / "checkpoints" / "last.ckpt")["cots"]["config"]["data"]
    entries = load_manifest(data["test_manifest"], data["image_root"])
    return entries, GalleryCaptions(entries)


def test_import_cots_loads_no_model_code():
    code = "import sys, cots; print(callable(cots.load), [m for m in ('torch', 'cots.retriever') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True []"


def test_the_retriever_describes_its_model(retriever):
    assert retriever.embed_dim == 32 and retriever.image_size == 32 and retriever.max_length == 32
    assert retriever.device == torch.device("cpu") and retriever.dtype == "float32"
    assert retriever.model_id == f"smoke-step2-{retriever.checksum[:8]}" and len(retriever.checksum) == 64
    assert not retriever.encoder.training
    assert retriever.preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    ids, mask = retriever.tokenizer(["a red circle"])
    assert ids.dtype == mask.dtype == torch.long and ids.shape == mask.shape


def test_paths_pil_images_and_tensors_give_the_same_embeddings(retriever, gallery):
    paths = [entry.image for entry in gallery[0][:5]]
    tensors = [retriever.preprocess(load_rgb(path)) for path in paths]
    from_paths = retriever.encode_images(paths)
    assert from_paths.shape == (5, 32) and from_paths.dtype == torch.float32
    torch.testing.assert_close(from_paths.norm(dim=1), torch.ones(5))
    assert torch.equal(retriever.encode_images([str(p) for p in paths]), from_paths)
    assert torch.equal(retriever.encode_images([Image.open(p) for p in paths]), from_paths)
    assert torch.equal(retriever.encode_images(torch.stack(tensors)), from_paths)
    mixed = [paths[0], Image.open(paths[1]), tensors[2], str(paths[3]), tensors[4]]
    assert torch.equal(retriever.encode_images(iter(mixed)), from_paths)  # any iterable, read batch by batch
    assert torch.equal(retriever.encode_images(paths[0]), retriever.encode_images([paths[0]]))  # alone: (1, D)
    # other batches: the same embeddings up to the last bits (bit-for-bit needs the same batches)
    torch.testing.assert_close(retriever.encode_images(paths, batch_size=2), from_paths, atol=1e-6, rtol=0)


def test_texts_single_and_empty(retriever):
    two = retriever.encode_texts(["a red  circle", "a blue square\n"])
    assert two.shape == (2, 32) and two.dtype == torch.float32
    torch.testing.assert_close(two.norm(dim=1), torch.ones(2))
    assert torch.equal(retriever.encode_texts(["a red circle"]), retriever.encode_texts("a red   circle"))
    assert retriever.encode_texts([]).shape == (0, 32) and retriever.encode_images([]).shape == (0, 32)
    long = retriever.encode_texts(["red " * 100])  # truncated at max_length tokens
    assert long.shape == (1, 32) and torch.isfinite(long).all()


def test_an_unreadable_image_names_its_file(retriever, gallery, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not an image")
    good = gallery[0][0].image
    with pytest.raises(UnreadableImage, match="notes.jpg") as caught:
        retriever.encode_images([good, not_an_image])
    assert caught.value.path == not_an_image and caught.value.reason == "undecodable"
    with pytest.raises(UnreadableImage, match="missing.png") as caught:
        retriever.prepare_image(tmp_path / "missing.png")
    assert caught.value.reason == "missing_file"


def test_bad_inputs_are_refused_with_what_was_expected(retriever, tiny_run):
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        retriever.encode_images(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="torch.uint8"):
        retriever.encode_images(torch.zeros(3, 32, 32, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int"):
        retriever.encode_images([3])
    with pytest.raises(TypeError, match="strings"):
        retriever.encode_texts(["fine", None])
    with pytest.raises(ValueError, match="autocast"):
        cots.load(tiny_run / "checkpoints" / "last.ckpt", autocast="fp8")


def test_a_missing_or_corrupt_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        cots.load(tmp_path / "nowhere.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x80\x02 not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.ckpt"):
        cots.load(corrupt)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a COTS checkpoint"):
        cots.load(foreign)


def test_a_checkpoint_is_read_with_weights_only(tiny_run, monkeypatch):
    calls = []
    original = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    cots.load(tiny_run / "checkpoints" / "last.ckpt")
    assert calls == [True]


def test_autocast_is_optional_and_returns_float32(tiny_run, retriever):
    fast = cots.load(tiny_run / "checkpoints" / "last.ckpt", autocast="bf16")
    texts = ["a red circle", "a green triangle at the top"]
    embeddings = fast.encode_texts(texts)
    assert embeddings.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(embeddings, retriever.encode_texts(texts)).min() > 0.95
