"""The dVAE (cots_dvae): conversion, safe loading, tokens, frozen state, dVAE training."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import attr
import pytest
import torch
import torch.nn.functional as F
from dall_e import Encoder, map_pixels
from PIL import Image

from cots.prepare.dvae_cli import main as cli_main
from cots_dvae import DalleTokenizer, ImageTokenizer, dvae_input_size
from cots_dvae.images import to_rgb
from cots_dvae.weights import load_weights, save_weights

TINY = dict(n_hid=16, n_blk_per_group=1, vocab_size=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: threads only add overhead


@pytest.fixture
def pickled_encoder(tmp_path: Path) -> tuple[Path, Encoder]:
    """A tiny random dall_e.Encoder pickled like the official encoder.pkl."""
    torch.manual_seed(0)
    with attr.validators.disabled():  # dall_e demands n_hid >= 64, vocab >= 512
        enc = Encoder(n_hid=16, n_blk_per_group=1, vocab_size=64)
    path = tmp_path / "encoder.pkl"
    torch.save(enc, path)
    return path, enc


def _forbid_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, boom)
    monkeypatch.setattr(torch, "load", boom)


def test_convert_then_load_without_pickle(pickled_encoder, tmp_path, monkeypatch, capsys):
    pkl, original = pickled_encoder
    out = tmp_path / "artifacts" / "dalle_encoder.safetensors"
    assert cli_main(["convert", "--pkl", str(pkl), "--out", str(out)]) == 0
    assert "arbitrary code" in capsys.readouterr().err

    _forbid_pickle(monkeypatch)
    tok = DalleTokenizer(out, input_size=32)  # architecture comes from the file's metadata
    assert (tok.vocab_size, tok.arch.n_hid, tok.arch.n_blk_per_group) == (64, 16, 1)

    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = original(map_pixels(images)).argmax(dim=1)
    assert torch.equal(tok.tokenize(images), expected)


def _blocks_of_colour() -> torch.Tensor:
    """(2, 3, 48, 48) images of coloured rectangles: a random tiny dVAE gives the same id to every patch of
    noise images, but several ids here (so that a transposed or differently resized token map is seen)."""
    images = torch.zeros(2, 3, 48, 48)
    images[0, 0, 5:29, 7:19], images[0, 1, 31:, 13:44], images[0, 2, :11, 25:] = 1.0, 0.8, 1.0
    images[1, :, :, :13], images[1, 0, 31:], images[1, 2, 17:26, 29:41] = 1.0, 1.0, 0.6
    return images


def test_tokens_shape_dtype_and_autocast():
    torch.manual_seed(0)
    tok = DalleTokenizer(input_size=32, **TINY)
    images = _blocks_of_colour()  # resized to input_size by preprocess
    tokens = tok.tokenize(images)
    assert tokens.unique().numel() > 2 and not torch.equal(tokens, tokens.transpose(1, 2))
    assert tokens.shape == (2, 32 // 8, 32 // 8) == (2, tok.grid_size(), tok.grid_size())
    assert tokens.dtype == torch.long and not tokens.requires_grad
    # the ids are the argmax over the vocabulary of the encoder's logits on the image resized to input_size
    # (bilinear, antialiased: the resize the token cache was built with)
    resized = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    with torch.no_grad():
        assert torch.equal(tokens, tok.encoder(map_pixels(resized)).argmax(dim=1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(tok.tokenize(images), tokens)
    assert dvae_input_size(224, 16) == 112 and tok.grid_size(64) == 8


def test_stays_frozen_after_train():
    tok = DalleTokenizer(input_size=32, **TINY)
    parent = torch.nn.Sequential(torch.nn.Linear(2, 2), tok)
    parent.train()
    assert isinstance(tok, ImageTokenizer)
    assert not tok.training and not tok.encoder.training
    assert not any(p.requires_grad for p in tok.parameters())
    assert parent[0].training


def test_load_errors_are_explicit(tmp_path):
    with pytest.raises(FileNotFoundError, match="cots-dvae convert"):
        DalleTokenizer(tmp_path / "missing.safetensors", input_size=32)

    good = DalleTokenizer(input_size=32, **TINY)
    weights = load_weights_from_module(good, tmp_path / "ok.safetensors")
    with pytest.raises(ValueError, match="vocab_size=128 but file has 64"):
        DalleTokenizer(weights, input_size=32, vocab_size=128)
    with pytest.raises(ValueError, match="input_size is required"):
        DalleTokenizer(weights)

    w = load_weights(weights)
    del w.encoder["blocks.group_2.block_1.id_path.w"]
    broken = save_weights(tmp_path / "broken.safetensors", w)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): \['blocks.group_2.block_1.id_path.w'\]"):
        DalleTokenizer(broken, input_size=32)


def load_weights_from_module(tok: DalleTokenizer, path: Path) -> Path:
    from cots_dvae.weights import DVAEWeights

    return save_weights(path, DVAEWeights(encoder=tok.encoder.state_dict(), arch=tok.arch))


def test_rgba_composited_on_white():
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)


def _shapes_manifest(root: Path, n: int = 32, size: int = 32) -> Path:
    """Coloured discs and squares on coloured backgrounds, plus a JSON manifest."""
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    entries = []
    for i in range(n):
        bg, fg = torch.rand(3, generator=gen), torch.rand(3, generator=gen)
        cy, cx = torch.randint(8, size - 8, (2,), generator=gen).tolist()
        r = int(torch.randint(4, 9, (1,), generator=gen))
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) if i % 2 else ((yy - cy).abs() < r) & ((xx - cx).abs() < r)
        img = torch.where(mask, fg[:, None, None], bg[:, None, None])
        array = (img.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(array).save(root / f"{i}.png")
        entries.append({"image": f"{i}.png", "caption": f"shape {i}"})
    manifest = root / "train.json"
    manifest.write_text(json.dumps(entries))
    return manifest


def test_trained_dvae_reconstructs_better_than_init(tmp_path, monkeypatch):
    manifest = _shapes_manifest(tmp_path)
    out = tmp_path / "dvae.safetensors"
    args = [
        "train",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--vocab-size",
        "64",
        "--n-hid",
        "16",
        "--n-blk-per-group",
        "1",
        "--n-init",
        "16",
        "--input-size",
        "32",
        "--steps",
        "60",
        "--batch-size",
        "16",
        "--lr",
        "3e-3",
        "--log-every",
        "1000",
        # heldout 0: evaluate on the 32 training images (8 held-out ones are too noisy a measure)
        "--heldout",
        "0",
    ]
    assert cli_main(args) == 0

    metrics = json.loads(out.with_name("dvae_metrics.json").read_text())
    init, final = metrics["init"]["recon_mse"], metrics["final"]["recon_mse"]
    assert final < 0.8 * init, (init, final)  # seeds 0-5 give ratios 0.52-0.69
    assert out.with_name("dvae_recon.png").is_file()

    _forbid_pickle(monkeypatch)
    tok = DalleTokenizer(out)  # input_size from the file
    assert tok.input_size == 32 and tok.vocab_size == 64
    assert tok.tokenize(torch.rand(1, 3, 32, 32)).shape == (1, 4, 4)
