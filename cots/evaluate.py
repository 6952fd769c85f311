"""`cots-eval ckpt_path=<ckpt> [data=...] [split=test]`: retrieval table of a checkpoint."""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cots.checkpoints import read_checkpoint, upgrade_run_config, upgrade_state_dict
from cots.console import quiet_expected_messages
from cots.report import write_report
from cots.train import CONF_DIR, build_module, report_retrieval

# Data keys the towers were built for: a data=<option> cannot change them.
MODEL_BOUND_DATA_KEYS = ("image_size", "text_tokenizer")


def eval_data_config(cfg: DictConfig, run_cfg: DictConfig) -> DictConfig:
    """The data config to score with: the checkpoint's, with the command line's data keys merged over it.

    With ``data=<option>`` the option replaces the checkpoint's data config, except the keys of
    ``MODEL_BOUND_DATA_KEYS``; otherwise only the keys given (not null) replace the checkpoint's.
    Neither needs training-only keys: training manifests are not read.
    """
    given = OmegaConf.to_container(cfg.data, resolve=True) if cfg.get("data") else {}
    if "_target_" in given:
        data = dict(given)
        data.update({key: run_cfg.data[key] for key in MODEL_BOUND_DATA_KEYS if key in run_cfg.data})
        return OmegaConf.create(data)
    data = OmegaConf.to_container(run_cfg.data, resolve=True)
    data.update({key: value for key, value in given.items() if value is not None})
    return OmegaConf.create(data)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the model from the checkpoint's own config, load its weights, score the gallery."""
    quiet_expected_messages()
    checkpoint = read_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(upgrade_run_config(checkpoint["cots"]["config"]))
    datamodule = instantiate(eval_data_config(cfg, run_cfg))
    datamodule.prepare_data()
    tokenizer = datamodule.build_text_tokenizer(checkpoint["cots"]["text_tokenizer"])
    module = build_module(run_cfg, tokenizer.vocab_size, tokenizer.to_str(), tokenizer.mask_id, tokenizer.special_ids)
    module.load_state_dict(upgrade_state_dict(checkpoint["state_dict"]))
    split = cfg.split if datamodule.manifests.get(cfg.split) else "val"
    trainer = L.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        precision=cfg.get("precision", "32-true"),
        logger=False,
        enable_checkpointing=False,
    )
    module.test_fold_size = datamodule.evaluation_fold_size(split)
    trainer.test(module, dataloaders=datamodule.gallery_loaders(split), verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    report_retrieval(module.last_retrieval, datamodule, split, output_dir, module.last_fold_tables)
    if cfg.get("report"):  # the training curves come from the checkpoint's own run folder
        metrics_csv = Path(cfg.ckpt_path).resolve().parent.parent / "csv" / "metrics.csv"
        png = write_report(
            module.model.encoder,
            datamodule.gallery_loaders(split),
            datamodule.gallery_captions(split).captions,
            metrics_csv,
            output_dir / "report.png",
            title=f"{run_cfg.task_name}: {split}",
        )
        print(f"wrote {png}")
    return module.last_retrieval


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
