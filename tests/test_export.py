"""``cots-export`` and ``cots.load`` on its folder: the embeddings cots-eval scores, dtypes, ONNX, bad inputs."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import cots
from cots import evaluate as evaluate_module
from cots import lit_module
from cots.checkpoints import read_checkpoint
from cots.data.datasets import GalleryCaptions
from cots.data.manifest import load_manifest
from cots.evaluate import evaluate
from cots.export import ExportError
from cots.export.cli import main as cots_export
from cots.metrics.retrieval import retrieval_metrics

CONFIG_KEYS = {
    "format",
    "format_version",
    "model_id",
    "checksum",
    "dtype",
    "weights_checksum",
    "embed_dim",
    "image_tower",
    "text_tower",
    "image_size",
    "max_length",
    "eval_batch_size",
    "metadata",
}
FILES = {"config.json", "model.safetensors", "tokenizer.json", "preprocess.json", "README.md"}
ONNX_FILES = {"image_encoder.onnx", "text_encoder.onnx"}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """The tiny run's last.ckpt exported by the CLI in fp32 with ONNX, and in fp16 and bf16: dtype -> folder."""
    root = tmp_path_factory.mktemp("exports")
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    assert cots_export([str(checkpoint), str(root / "fp32"), "--onnx"]) == 0
    for dtype in ("fp16", "bf16"):
        assert cots_export([str(checkpoint), str(root / dtype), "--dtype", dtype]) == 0
    return {dtype: root / dtype for dtype in ("fp32", "fp16", "bf16")}


def _test_gallery(checkpoint):
    data = read_checkpoint(checkpoint)["cots"]["config"]["data"]
    entries = load_manifest(data["test_manifest"], data["image_root"])
    return [entry.image for entry in entries], GalleryCaptions(entries)


def test_checkpoint_and_export_score_the_gallery_exactly_as_cots_eval(
    tiny_run, exported, make_cfg, tmp_path, monkeypatch
):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    scored = {}

    def spy(images, texts, text_to_image, *args, **kwargs):
        scored.update(images=images.clone(), texts=texts.clone())
        return retrieval_metrics(images, texts, text_to_image, *args, **kwargs)

    monkeypatch.setattr(lit_module, "retrieval_metrics", spy)
    evaluate(make_cfg(f"ckpt_path={checkpoint}", "split=test", "accelerator=cpu", config_name="eval"))
    cots_eval_table = json.loads((tmp_path / "run" / "retrieval.json").read_text())
    paths, captions = _test_gallery(checkpoint)
    text_to_image = torch.tensor(captions.text_to_image)
    for source in (checkpoint, exported["fp32"]):
        model = cots.load(source)
        images, texts = model.encode_images(paths), model.encode_texts(captions.captions)
        assert torch.equal(images, scored["images"]) and torch.equal(texts, scored["texts"]), source
        assert retrieval_metrics(images, texts, text_to_image) == cots_eval_table, source


def test_cots_eval_in_bf16_scores_what_the_retriever_gives_under_bf16_autocast(tiny_run, make_cfg, monkeypatch):
    """precision=bf16-mixed reproduces the end-of-training table of a bf16 run; the default stays fp32."""
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    scored = []
    monkeypatch.setattr(lit_module, "retrieval_metrics", lambda images, texts, *a, **k: scored.append(images) or {})
    monkeypatch.setattr(evaluate_module, "report_retrieval", lambda *args: None)
    for precision in ("bf16-mixed", "32-true"):
        evaluate(make_cfg(f"ckpt_path={checkpoint}", f"precision={precision}", "accelerator=cpu", config_name="eval"))
    paths, _ = _test_gallery(checkpoint)
    assert torch.equal(scored[0], cots.load(checkpoint, autocast="bf16").encode_images(paths))
    assert torch.equal(scored[1], cots.load(checkpoint).encode_images(paths))
    assert not torch.equal(scored[0], scored[1])


def test_an_export_holds_the_online_encoder_and_describes_it(tiny_run, exported):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    folder = exported["fp32"]
    assert {p.name for p in folder.iterdir()} == FILES | ONNX_FILES
    assert not list(folder.parent.glob(".*"))  # no temporary folder left behind
    config = json.loads((folder / "config.json").read_text())
    assert set(config) == CONFIG_KEYS and config["format"] == "cots-two-stream-encoder"
    assert config["image_tower"] == {
        "name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3
    }  # fmt: skip
    assert config["text_tower"]["pooling"] == "cls" and config["text_tower"]["bert_config"]["hidden_size"] == 48
    meta = config["metadata"]
    assert meta["source_checkpoint"] == "last.ckpt" and meta["global_step"] == 2 and meta["seed"] == 42
    assert meta["data"]["test_manifest"].endswith("test.json") and "inst" in meta["objective"]
    weights = load_file(folder / "model.safetensors")
    state = read_checkpoint(checkpoint)["state_dict"]
    online = {k.removeprefix("model.encoder."): v for k, v in state.items() if k.startswith("model.encoder.")}
    assert weights.keys() == online.keys() and all(torch.equal(weights[k], online[k]) for k in weights)
    from_checkpoint, from_export = cots.load(checkpoint), cots.load(folder)
    assert from_checkpoint.checksum == from_export.checksum == config["checksum"] == config["weights_checksum"]
    assert from_checkpoint.model_id == from_export.model_id == config["model_id"]
    # the card: towers, data, steps, and both tables known for the weights (validation at step 2, the run's test)
    stored = read_checkpoint(checkpoint)["cots"]["last_evaluation"]
    assert stored["stage"] == "val" and stored["global_step"] == 2 and stored["images"] == 64
    run_table = json.loads((tiny_run / "retrieval.json").read_text())
    assert [e["table"] for e in meta["evaluations"]] == [stored["table"], run_table]
    card = (folder / "README.md").read_text()
    for text in (
        "vit_tiny_patch16_224",
        "after 2 optimizer steps",
        "test.json",
        f"{run_table['rsum']:.2f}",
        "cots.load",
    ):
        assert text in card, text


def test_fp16_and_bf16_exports_keep_the_model_identity(exported):
    reference = cots.load(exported["fp32"])
    size = (exported["fp32"] / "model.safetensors").stat().st_size
    captions = ["a red circle in the top left", "a blue square"]
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        folder = exported[dtype]
        assert {p.name for p in folder.iterdir()} == FILES
        assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch_dtype}
        assert (folder / "model.safetensors").stat().st_size < 0.55 * size
        model = cots.load(folder)
        assert model.dtype == str(torch_dtype).removeprefix("torch.") and model.checksum == reference.checksum
        assert model.config["weights_checksum"] != reference.checksum
        embeddings = model.encode_texts(captions)  # rounded weights, upcast: float32 computation
        assert embeddings.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(embeddings, reference.encode_texts(captions)).min() > 0.99


def test_onnx_graphs_match_pytorch_within_1e_4(exported):
    ort = pytest.importorskip("onnxruntime", reason="the export extra: pip install -e '.[export]'")
    folder = exported["fp32"]
    model = cots.load(folder)
    options = {"providers": ["CPUExecutionProvider"]}
    image_graph = ort.InferenceSession(str(folder / "image_encoder.onnx"), **options)
    text_graph = ort.InferenceSession(str(folder / "text_encoder.onnx"), **options)
    generator = torch.Generator().manual_seed(0)
    for captions in (["a red circle"], ["red circle " * n for n in (1, 3, 5, 8, 12)]):  # (1, 5) and (5, 26) tokens
        batch = len(captions)
        images = torch.randn(batch, 3, 32, 32, generator=generator)
        (onnx_images,) = image_graph.run(None, {"images": images.numpy()})
        assert onnx_images.shape == (batch, 32)
        assert (torch.from_numpy(onnx_images) - model.encode_images(images)).abs().max() <= 1e-4
        input_ids, attention_mask = model.tokenizer(captions)  # padded to the longest caption of the batch
        assert attention_mask.shape[1] == (5 if batch == 1 else 26)
        (onnx_texts,) = text_graph.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        assert (torch.from_numpy(onnx_texts) - model.encode_texts(captions)).abs().max() <= 1e-4


def test_loading_an_export_unpickles_nothing(exported, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an export must load without unpickling")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(module, name, refuse)
    assert cots.load(exported["bf16"]).encode_texts(["a red circle"]).shape == (1, 32)


def test_cli_errors_name_the_problem(tiny_run, exported, tmp_path, capsys):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    assert cots_export([str(tmp_path / "absent.ckpt"), str(tmp_path / "out")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    assert cots_export([str(corrupt), str(tmp_path / "out")]) == 2
    assert "corrupt.ckpt" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert cots_export([str(checkpoint), str(taken)]) == 2
    assert "not empty (--force" in capsys.readouterr().err and (taken / "keep.txt").exists()
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*"))
    assert cots_export([str(checkpoint), str(taken), "--force", "--retrieval", str(tiny_run / "retrieval.json")]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors" in out and "% of the checkpoint" in out
    assert {p.name for p in taken.iterdir()} == FILES and not list(tmp_path.glob(".*"))
    assert "given to cots-export: retrieval.json" in (taken / "README.md").read_text()


def test_a_damaged_export_is_refused_naming_the_file(exported, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exported["fp16"], folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.safetensors"):
        cots.load(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ExportError, match="missing tokenizer.json"):
        cots.load(folder)


def test_a_checkpoint_from_before_last_evaluation_still_exports(tiny_run, tmp_path):
    checkpoint = torch.load(tiny_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    del checkpoint["cots"]["last_evaluation"]
    older = tmp_path / "checkpoints" / "older.ckpt"
    older.parent.mkdir()
    torch.save(checkpoint, older)
    assert cots_export([str(older), str(tmp_path / "export")]) == 0
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["metadata"]["evaluations"] == [] and config["metadata"]["source_checkpoint"] == "older.ckpt"
    assert "No retrieval table is known" in (tmp_path / "export" / "README.md").read_text()
