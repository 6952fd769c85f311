"""The paper's protocol end to end on a Karpathy-format fixture: pretrain (smoke) -> zero-shot cots-eval ->
experiment=finetune_coco from the checkpoint (model.init_from) -> cots-eval of the fine-tuned checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from karpathy_fixture import write_karpathy
from omegaconf import DictConfig, open_dict

from cots.checkpoints import read_checkpoint
from cots.evaluate import evaluate
from cots.train import CONF_DIR, train

# experiment=finetune_coco on the tiny towers of tests/conftest.py's TINY (what the smoke pretraining builds)
TINY_FINETUNE = [
    "model.queue_size=64",
    "model.encoder.embed_dim=32",
    "model.encoder.image_tower.name=vit_tiny_patch16_224",
    "model.encoder.image_tower.patch_size=8",
    "model.encoder.image_tower.embed_dim=48",
    "model.encoder.image_tower.depth=1",
    "model.encoder.image_tower.num_heads=3",
    "model.encoder.text_tower.hidden_size=48",
    "model.encoder.text_tower.num_layers=1",
    "model.encoder.text_tower.num_heads=3",
    "data.image_size=32",
    "data.text_tokenizer.max_length=32",
    "data.batch_size=8",
    "data.eval_batch_size=64",
    "trainer=cpu",
    "module.compile=null",
    "trainer.max_steps=3",
    "trainer.max_epochs=-1",
    "trainer.val_check_interval=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "~logger.tensorboard",
]


def _compose(config_name: str, overrides: list[str], out: Path, data_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir, cfg.paths.data_dir, cfg.paths.log_dir = str(out), str(data_dir), str(out / "logs")
    return cfg


def test_karpathy_fixture_goes_through_pretraining_zero_shot_fine_tuning_and_evaluation(make_cfg, data_dir, tmp_path):
    root = tmp_path / "coco"
    karpathy = write_karpathy(root, "coco")  # 16 train + 8 restval, 6 val, 10 test images; 5 captions each
    data = [f"data.karpathy_json={karpathy}", f"data.image_root={root}", "data.dataset=coco", "data.num_workers=0"]
    data.append("data.test_fold_size=2")  # the fixture's 10 test images in five folds, as COCO's 5K in 1K

    # 1. pretrain: experiment=smoke on the synthetic shapes (tiny towers)
    pretrain = make_cfg("trainer.max_steps=3")
    train(pretrain)
    source = tmp_path / "run" / "checkpoints" / "last.ckpt"

    # 2. zero-shot: cots-eval ckpt_path=<pretraining> data=karpathy data.karpathy_json=... data.image_root=...
    zero_shot_dir = tmp_path / "zero_shot"
    evaluate(
        _compose("eval", [f"ckpt_path={source}", "data=karpathy", *data, "accelerator=cpu"], zero_shot_dir, data_dir)
    )
    zero_shot = json.loads((zero_shot_dir / "retrieval.json").read_text())
    assert zero_shot["folds"]["fold_size"] == 2 and len(zero_shot["folds"]["per_fold"]) == 5
    assert zero_shot["rsum"] < zero_shot["folds"]["mean"]["rsum"]  # a fifth of the distractors per fold

    # 3. fine-tune: experiment=finetune_coco model.init_from=<pretraining> (a new run: step 0, fresh queues)
    finetune_dir = tmp_path / "finetune"
    overrides = ["experiment=finetune_coco", f"model.init_from={source}", *data, *TINY_FINETUNE]
    metrics, objects = train(_compose("train", overrides, finetune_dir, data_dir))
    assert objects["trainer"].global_step == 3 and "val/rsum" in metrics  # validated on the Karpathy val split
    assert {"test/rsum", "test_fold2/rsum"} <= set(metrics)
    assert len(objects["datamodule"].entries("train")) == 24  # restval joins train
    tuned = read_checkpoint(finetune_dir / "checkpoints" / "last.ckpt")
    before = read_checkpoint(source)["state_dict"]["model.encoder.text_proj.weight"]
    assert tuned["global_step"] == 3 and not torch.equal(tuned["state_dict"]["model.encoder.text_proj.weight"], before)

    # 4. evaluate the fine-tuned checkpoint: its own data config is the Karpathy one
    eval_dir = tmp_path / "eval"
    table = evaluate(_compose("eval", [f"ckpt_path={finetune_dir / 'checkpoints' / 'last.ckpt'}"], eval_dir, data_dir))
    written = json.loads((eval_dir / "retrieval.json").read_text())
    assert written["rsum"] == table["rsum"] == metrics["test/rsum"]  # cots-train's test = cots-eval's
    assert written["folds"]["mean"]["rsum"] == metrics["test_fold2/rsum"]
