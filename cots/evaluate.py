"""`cots-eval ckpt_path=<ckpt> [data=...] [split=test]`: retrieval table of a checkpoint."""
from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cots.checkpoints import read_checkpoint
from cots.report import write_report
from cots.train import CONF_DIR, build_module, report_retrieval


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the model from the checkpoint's own config, load its weights, score the gallery."""
    checkpoint = read_checkpoint(cfg.ckpt_path)
    run_cfg = OmegaConf.create(checkpoint["cots"]["config"])
    data_cfg = cfg.data if cfg.get("data") else run_cfg.data
    datamodule = instantiate(data_cfg)
    datamodule.prepare_data()
    tokenizer = datamodule.build_text_tokenizer(checkpoint["cots"]["text_tokenizer"])
    module = build_module(run_cfg, tokenizer.vocab_size, tokenizer.to_str(), tokenizer.mask_id, tokenizer.special_ids)
    module.load_state_dict(checkpoint["state_dict"])
    split = cfg.split if datamodule.manifests.get(cfg.split) else "val"
    trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False)
    trainer.test(module, dataloaders=datamodule.gallery_loaders(split), verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    report_retrieval(module.last_retrieval, datamodule, split, output_dir)
    if cfg.get("report"):  # the training curves come from the checkpoint's own run folder
        metrics_csv = Path(cfg.ckpt_path).resolve().parent.parent / "csv" / "metrics.csv"
        png = write_report(module.model.encoder, datamodule.gallery_loaders(split),
                           datamodule.gallery_captions(split).captions, metrics_csv, output_dir / "report.png",
                           title=f"{run_cfg.task_name}: {split}")
        print(f"wrote {png}")
    return module.last_retrieval


@hydra.main(config_path=CONF_DIR, config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
