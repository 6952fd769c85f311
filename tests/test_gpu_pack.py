"""What travels to a GPU machine comes back as it was: the emoji set exactly, the text tower within int8."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BertConfig, BertModel

from cots.models.text_tower import TextTower

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_pack  # noqa: E402
import gpu_unpack  # noqa: E402


def test_the_emoji_set_comes_back_with_the_same_pixels_and_manifests(tmp_path):
    emoji = tmp_path / "data" / "emoji"
    rng = np.random.default_rng(0)
    for vendor in ("google", "twitter"):
        (emoji / "images" / vendor).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(emoji / "images" / vendor / f"{k:04x}.png")
    manifest = [{"image": "images/google/0000.png", "caption": "grinning face"}]
    (emoji / "train.json").write_text(json.dumps(manifest))

    assert gpu_pack.pack_emoji(emoji, tmp_path / "emoji.tar.gz") == 6
    assert gpu_unpack.unpack_emoji(tmp_path / "emoji.tar.gz", tmp_path / "there") == 6

    back = tmp_path / "there" / "emoji"
    assert json.loads((back / "train.json").read_text()) == manifest
    for original in sorted(emoji.rglob("*.png")):
        copy = back / original.relative_to(emoji)
        assert np.array_equal(np.asarray(Image.open(copy)), np.asarray(Image.open(original))), copy


def test_the_packed_text_tower_loads_as_fp32_within_int8_of_its_embeddings_and_fp16_elsewhere(tmp_path):
    config = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    original = BertModel(config)  # with the pooler a sentence encoder's checkpoint carries
    original.save_pretrained(tmp_path / "source")
    gpu_pack.pack_minilm(tmp_path / "source", tmp_path / "packed")
    gpu_unpack.unpack_minilm(tmp_path / "packed", tmp_path / "unpacked")

    tower = TextTower(pretrained=str(tmp_path / "unpacked"))
    assert {p.dtype for p in tower.parameters()} == {torch.float32}
    word, word_back = original.embeddings.word_embeddings.weight, tower.bert.embeddings.word_embeddings.weight
    row_max = word.abs().amax(dim=1, keepdim=True)
    error = (word_back - word).abs()
    assert torch.all(error <= row_max / 254 + row_max * 1e-3)  # half a code step, the scale's fp16 rounding
    assert error.max() > 0  # it was quantized
    query = tower.bert.encoder.layer[0].attention.self.query.weight
    expected = original.encoder.layer[0].attention.self.query.weight.half().float()
    assert torch.equal(query, expected)
