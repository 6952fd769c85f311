"""End-to-end runs of the real config on tiny towers: smoke, overfit, EMA, resume, eval, start-up checks."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from cots.checkpoints import CheckpointError
from cots.config_checks import ConfigError
from cots.metrics.retrieval import chance_table
from cots.train import train


def test_smoke_trains_end_to_end_and_writes_retrieval_json(make_cfg, tmp_path):
    metrics, objects = train(make_cfg("test=true"))
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    table = json.loads((tmp_path / "run" / "retrieval.json").read_text())
    assert set(table) == {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "r_mean", "rsum"}
    model = objects["module"].model
    assert int(model.feature_queue.image.filled) == 4 * 16  # 4 steps x batch 16 enqueued
    # no validation ran before max_steps, yet last.ckpt holds the final step
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4


def test_short_overfit_run_lifts_retrieval_well_above_chance(make_cfg):
    cfg = make_cfg(
        "debug=overfit",
        "data.synthetic.num_train=64",
        "data.batch_size=32",
        "model.queue_size=128",
        "trainer.max_steps=200",
        "trainer.max_epochs=-1",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=200",
        "optim.optimizer.lr=2e-3",
        "test=true",
    )
    metrics, _ = train(cfg)
    chance = chance_table(64, 3)  # rsum about 49
    assert metrics["test/rsum"] > 3 * chance["rsum"], metrics
    for key in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10"):
        assert metrics[f"test/{key}"] > 2 * chance[key], (key, metrics)


def test_momentum_moves_once_per_optimizer_step_under_accumulation(make_cfg, monkeypatch):
    from cots.models.cots_model import COTSModel

    calls = []
    original = COTSModel.momentum_update

    def counting(self, m):
        before = [p.detach().clone() for p in self.momentum_encoder.parameters()]
        online = [p.detach().clone() for p in self.encoder.parameters()]
        original(self, m)
        after = list(self.momentum_encoder.parameters())
        expected = [m * b + (1 - m) * o for b, o in zip(before, online, strict=False)]
        calls.append(max((a - e).abs().max().item() for a, e in zip(after, expected, strict=False)))

    monkeypatch.setattr(COTSModel, "momentum_update", counting)
    cfg = make_cfg("trainer.accumulate_grad_batches=2", "trainer.max_steps=2", "module.momentum=0.9")
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    assert len(calls) == 2  # 4 micro-batches, 2 optimizer steps, 2 EMA updates
    assert max(calls) < 1e-6  # each update is exactly theta_hat <- m theta_hat + (1-m) theta


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_resume_reproduces_an_uninterrupted_run(make_cfg, tmp_path):
    # 64 images x 3 captions / batch 16 = 12 steps per epoch: a checkpoint at step 5 (mid-epoch),
    # then resume to step 20 (through the next epoch).
    common = (
        "trainer.deterministic=true",
        "trainer.check_val_every_n_epoch=null",
        "trainer.val_check_interval=null",
        "trainer.limit_val_batches=0",
        "trainer.max_epochs=-1",
        "data.train_transform.scale=[0.3,1.0]",
        "data.synthetic.num_train=64",
    )
    _, full = train(make_cfg(*common, "trainer.max_steps=20"))
    saving = (
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "callbacks.model_checkpoint.monitor=null",
        "callbacks.model_checkpoint.save_top_k=-1",
        "callbacks.model_checkpoint.filename='s{step}'",
    )
    train(make_cfg(*common, *saving, "trainer.max_steps=7"))
    ckpt = tmp_path / "run" / "checkpoints" / "s5.ckpt"
    _, resumed = train(make_cfg(*common, "trainer.max_steps=20", f"ckpt_path={ckpt}"))
    assert resumed["trainer"].global_step == 20
    expected, got = _state(full["module"]), _state(resumed["module"])
    assert expected.keys() == got.keys()
    diffs = {k: (expected[k].float() - got[k].float()).abs().max().item() for k in expected}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] < 1e-5, (worst, diffs[worst])
    assert any(k.startswith("momentum_encoder.") for k in got) and "feature_queue.image.data" in got
    opt_full = full["trainer"].optimizers[0].state_dict()["state"]
    opt_resumed = resumed["trainer"].optimizers[0].state_dict()["state"]
    for key in opt_full:
        torch.testing.assert_close(opt_full[key]["exp_avg"], opt_resumed[key]["exp_avg"], atol=1e-5, rtol=0)


def test_checkpoint_holds_no_pickled_objects_and_cots_eval_reads_it(make_cfg, tmp_path):
    from cots.evaluate import evaluate

    _, objects = train(make_cfg())
    ckpt = tmp_path / "final.ckpt"
    objects["trainer"].save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)  # fails on pickled objects
    assert "hyper_parameters" not in checkpoint
    assert any(k.startswith("model.feature_queue.") for k in checkpoint["state_dict"])
    eval_cfg = make_cfg(f"ckpt_path={ckpt}", "split=test", "accelerator=cpu", "report=true", config_name="eval")
    table = evaluate(eval_cfg)
    assert (tmp_path / "run" / "report.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "run" / "retrieval.json").read_text())
    assert written == pytest.approx(table)
    # the same weights score the same gallery the same way as the trainer's own test loop
    objects["trainer"].test(objects["module"], datamodule=objects["datamodule"], verbose=False)
    assert objects["module"].last_retrieval == pytest.approx(table)
    # "score this checkpoint on that manifest" is one override: the rest comes from the checkpoint
    other = objects["datamodule"].manifests["val"]
    on_other = evaluate(
        make_cfg(f"ckpt_path={ckpt}", f"data.test_manifest={other}", "accelerator=cpu", config_name="eval")
    )
    objects["trainer"].test(objects["module"], dataloaders=objects["datamodule"].gallery_loaders("val"), verbose=False)
    assert on_other == pytest.approx(objects["module"].last_retrieval) and on_other != pytest.approx(table)
    # a data option works too (its ${seed} and paths resolve; the image size stays the checkpoint's)
    with_option = evaluate(
        make_cfg(
            f"ckpt_path={ckpt}",
            "data=synthetic",
            "data.image_size=64",
            "data.synthetic.num_train=8",
            f"data.test_manifest={other}",
            f"paths.data_dir={tmp_path}/elsewhere",
            "accelerator=cpu",
            config_name="eval",
        )
    )
    assert with_option == pytest.approx(on_other)


def test_corrupt_checkpoint_is_named_in_the_error(make_cfg, tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt"):
        train(make_cfg(f"ckpt_path={bad}"))


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.queue_size=8", "model.queue_size"),
        ("model.encoder.image_tower.name=vit_does_not_exist", "model.encoder.image_tower.name"),
        ("data.val_manifest=/nonexistent/val.json", "data.val_manifest"),
        ("data.image_size=36", "data.image_size"),
        ("optim.optimizer.fused=true trainer.precision=16-mixed", "optim.optimizer.fused"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(make_cfg, override, key, monkeypatch):
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(make_cfg(*override.split()))
