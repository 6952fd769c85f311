"""model.init_from: a new run from a checkpoint's or an export's encoder, everything else fresh; misfits refused."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import open_dict

from cots.checkpoints import read_checkpoint
from cots.export.cli import main as cots_export
from cots.init_from import InitFromError, InitSource, initialize_from, read_init_source
from cots.train import build_module, train


def _source_encoder(checkpoint) -> dict[str, torch.Tensor]:
    state = read_checkpoint(checkpoint)["state_dict"]
    return {k.removeprefix("model.encoder."): v for k, v in state.items() if k.startswith("model.encoder.")}


def _assert_state_equal(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = module.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k].to(state[k].dtype)) for k in state)


def test_a_checkpoint_starts_a_fresh_run_with_its_encoder(tiny_run, make_cfg, capsys):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    _, objects = train(make_cfg(f"model.init_from={checkpoint}", "trainer.max_steps=0"))
    model, trainer = objects["module"].model, objects["trainer"]
    source = _source_encoder(checkpoint)
    _assert_state_equal(model.encoder, source)
    _assert_state_equal(model.momentum_encoder, source)  # a fresh EMA start from the same weights
    assert int(model.feature_queue.image.filled) == 0 and int(model.feature_queue.text.filled) == 0
    assert int(objects["module"].amf.similarity_queue.filled) == 0
    assert trainer.global_step == 0 and read_checkpoint(checkpoint)["global_step"] == 2
    assert model.temperature().item() == pytest.approx(0.07)  # model.temperature, not the source's
    # the source's caption tokenizer, so that word ids mean what they meant
    assert objects["module"].text_tokenizer_json == read_checkpoint(checkpoint)["cots"]["text_tokenizer"]
    assert "init_from" in capsys.readouterr().out


def test_fine_tuning_counts_its_own_steps(tiny_run, make_cfg, tmp_path):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    _, objects = train(make_cfg(f"model.init_from={checkpoint}", "trainer.max_steps=3"))
    saved = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == 3  # not 2 + 3: the optimizer, schedule and loop started at 0
    assert saved["cots"]["config"]["model"]["init_from"] == str(checkpoint)  # provenance
    assert int(objects["module"].model.feature_queue.image.filled) == 3 * 16


def test_an_fp16_export_folder_initialises_the_encoder(tiny_run, make_cfg, tmp_path):
    folder = tmp_path / "export"
    assert cots_export([str(tiny_run / "checkpoints" / "last.ckpt"), str(folder), "--dtype", "fp16"]) == 0
    source = read_init_source(folder)
    assert source.kind == "export" and source.heads == {} and source.step == 2
    cfg = make_cfg(f"model.init_from={folder}", "trainer.max_steps=0")
    _, objects = train(cfg)
    _assert_state_equal(objects["module"].model.encoder, {k: v.float() for k, v in source.encoder.items()})
    with pytest.raises(InitFromError, match="is an export folder, which holds no heads"):
        train(make_cfg(f"model.init_from={folder}", "model.init_heads=true", "trainer.max_steps=0"))


def test_a_model_of_other_shapes_is_refused_naming_the_tensors(tiny_run, make_cfg):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    with pytest.raises(InitFromError) as error:
        train(make_cfg(f"model.init_from={checkpoint}", "model.encoder.embed_dim=16", "trainer.max_steps=0"))
    message = str(error.value)
    assert "different shapes (4): image_proj.bias: source (32,), model (16,)" in message
    assert "text_proj.weight: source (32, 48), model (16, 48)" in message
    assert "the source has image_size 32, max_length 32" in message
    with pytest.raises(InitFromError, match=r"in the model, not in the source \(\d+\): image_tower.vit.blocks.1"):
        train(make_cfg(f"model.init_from={checkpoint}", "model.encoder.image_tower.depth=2", "trainer.max_steps=0"))


def test_heads_load_only_when_asked_and_only_those_the_model_builds(make_cfg):
    cmlm = ("objective.cmlm.enabled=true", "data.text_mask={mask_prob: 0.15, replace_prob: 0.8, random_prob: 0.1}")
    source_module = build_module(make_cfg(*cmlm, "seed=1"), 200, None, 4, [0, 1, 2, 3])
    state = source_module.model.state_dict()
    source = InitSource(
        path=source_module.__class__.__name__, kind="checkpoint", tokenizer_json="", settings={}, step=7,
        encoder={k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")},
        heads={k: v for k, v in state.items() if k.startswith("cmlm_head.")},
    )  # fmt: skip
    target = build_module(make_cfg(*cmlm), 200, None, 4, [0, 1, 2, 3]).model
    initial_head = {k: v.clone() for k, v in target.cmlm_head.state_dict().items()}
    report = initialize_from(target, source, heads=False)
    assert report.heads == [] and torch.equal(target.cmlm_head.dense.weight, initial_head["dense.weight"])
    report = initialize_from(target, source, heads=True)
    assert report.heads == ["cmlm_head"] and "heads loaded: cmlm_head" in report.summary(source)
    _assert_state_equal(target.cmlm_head, {k.removeprefix("cmlm_head."): v for k, v in source.heads.items()})
    # the CMLM decoder is the word embedding matrix: still tied after loading
    assert target.cmlm_head.decoder.weight is target.encoder.text_tower.word_embeddings.weight
    # a model without the head ignores the source's; a head the source lacks is refused
    plain = build_module(make_cfg(), 200, None, 4, [0, 1, 2, 3]).model
    assert initialize_from(plain, source, heads=True).heads == []
    headless = InitSource(**{**source.__dict__, "heads": {}})
    with pytest.raises(
        InitFromError, match=r"heads weights .* in the model, not in the source \(7\): cmlm_head.decoder.bias"
    ):
        initialize_from(target, headless, heads=True)


def test_a_resume_wins_over_init_from(tiny_run, make_cfg, capsys):
    checkpoint = tiny_run / "checkpoints" / "last.ckpt"
    _, objects = train(make_cfg("model.init_from=/nowhere.ckpt", f"ckpt_path={checkpoint}", "trainer.max_steps=3"))
    assert objects["trainer"].global_step == 3  # resumed at 2
    assert "is not read: the run resumes from ckpt_path" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="model.init_from: nothing at /nowhere.ckpt"):
        train(make_cfg("model.init_from=/nowhere.ckpt"))


def test_the_model_group_builds_alone_and_refuses_a_start_it_cannot_load(make_cfg):
    """instantiate(cfg.model), as tests and bench/ build a bare model: fine without init_from, an error with it."""
    plain, start = make_cfg(), make_cfg("model.init_from=/some.ckpt")
    for cfg in (plain, start):
        with open_dict(cfg):
            cfg.model.encoder.text_tower.vocab_size = 50  # what a caption tokenizer fills in
    assert instantiate(plain.model).feature_queue.size == 64
    with pytest.raises(InstantiationException, match="COTSModel loads no weights; cots-train does"):
        instantiate(start.model)
