"""`cots-train`: build everything from the Hydra config, fit, evaluate retrieval, report."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from cots.callbacks import RecoveryCheckpoint
from cots.checkpoints import read_checkpoint
from cots.config_checks import ConfigError, check_config
from cots.console import quiet_expected_messages
from cots.init_from import InitSource, initialize_from, read_init_source
from cots.metrics.folds import FoldTables, fold_table_prefix
from cots.metrics.retrieval import chance_table, format_table
from cots.next_steps import print_use_the_model
from cots.precision import fall_back_from_emulated_bf16
from cots.report import write_report
from cots.training_step import TrainingStep

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
INIT_KEYS = ("init_from", "init_heads")  # model keys of a fine-tuning start (cots/init_from.py)


def build_module(
    cfg: DictConfig,
    text_vocab_size: int,
    tokenizer_json: str | None,
    mask_id: int | None = None,
    special_ids: list[int] | None = None,
):
    """The LightningModule for a run config (model, training step, optimizer, scheduler).

    ``text_vocab_size``, ``mask_id`` and ``special_ids`` come from the caption tokenizer: the text
    tower's vocabulary when built from scratch, and ViLEM's error positions and replacements.
    """
    with open_dict(cfg):
        if not cfg.model.encoder.text_tower.pretrained:
            cfg.model.encoder.text_tower.vocab_size = text_vocab_size
        if cfg.objective.get("vilem") is not None:
            cfg.objective.vilem.vocab_size = text_vocab_size
            cfg.objective.vilem.mask_id = mask_id
            cfg.objective.vilem.special_ids = None if special_ids is None else [int(i) for i in special_ids]
    # model.init_from / init_heads are loaded by train() (cots.init_from); COTSModel refuses a set init_from
    model = instantiate(
        {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True).items() if k not in INIT_KEYS}
    )
    step = TrainingStep.from_config(instantiate(cfg.objective), cfg.data.get("image_tokens"))
    module = instantiate(
        cfg.module,
        model=model,
        step=step,
        optimizer=instantiate(cfg.optim.optimizer),
        scheduler=instantiate(cfg.optim.scheduler) if cfg.optim.get("scheduler") else None,
        lr_scale=cfg.optim.get("lr_scale"),
    )
    # Set after instantiate: Hydra would otherwise build every _target_ inside the config dict.
    module.run_config = OmegaConf.to_container(cfg, resolve=True)
    module.text_tokenizer_json = tokenizer_json
    return module


def start_source(cfg: DictConfig) -> InitSource | None:
    """The weights ``model.init_from`` names (a fine-tuning start), or None. A resume (``ckpt_path``) wins: its
    checkpoint already holds the run's own weights, so a fine-tuning run resumes with its first command line."""
    if not cfg.model.get("init_from"):
        return None
    if cfg.get("ckpt_path"):
        print(f"model.init_from={cfg.model.init_from} is not read: the run resumes from ckpt_path={cfg.ckpt_path}")
        return None
    return read_init_source(cfg.model.init_from)


def _instantiate_all(group: DictConfig | None) -> list:
    return [instantiate(item) for item in (group or {}).values() if item is not None and "_target_" in item]


def train(cfg: DictConfig) -> tuple[dict[str, float], dict]:
    """Fit and (optionally) test. Returns (metrics, objects) for tests and scripts."""
    check_config(cfg)
    fall_back_from_emulated_bf16(cfg)
    quiet_expected_messages()
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    problems = datamodule.missing_files()
    if problems:
        raise ConfigError("; ".join(problems))
    init_source = start_source(cfg)
    if cfg.get("ckpt_path"):
        saved_tokenizer = read_checkpoint(cfg.ckpt_path)["cots"]["text_tokenizer"]
    else:  # a fine-tuning start keeps the source's word ids
        saved_tokenizer = init_source.tokenizer_json if init_source else None
    tokenizer = datamodule.build_text_tokenizer(saved_tokenizer)
    module = build_module(cfg, tokenizer.vocab_size, tokenizer.to_str(), tokenizer.mask_id, tokenizer.special_ids)
    if init_source is not None:
        print(initialize_from(module.model, init_source, bool(cfg.model.get("init_heads"))).summary(init_source))
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        callbacks=_instantiate_all(cfg.get("callbacks")),
        logger=_instantiate_all(cfg.get("logger")) or False,
    )
    # weights_only: a resume unpickles nothing (checkpoints hold tensors and plain data only)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        split = "test" if cfg.data.get("test_manifest") else "val"
        module.test_fold_size = datamodule.evaluation_fold_size(split)
        trainer.test(module, datamodule=datamodule, verbose=False)
        metrics.update({f"test/{k}": v for k, v in module.last_retrieval.items()})
        folds = module.last_fold_tables
        if folds is not None:
            metrics.update({f"{fold_table_prefix('test', folds.fold_size)}/{k}": v for k, v in folds.mean.items()})
        output_dir = Path(cfg.paths.output_dir)
        report_retrieval(module.last_retrieval, datamodule, split, output_dir, folds)
        if cfg.get("report") and trainer.is_global_zero:
            png = write_report(
                module.model.encoder,
                datamodule.gallery_loaders(split),
                datamodule.gallery_captions(split).captions,
                output_dir / "csv" / "metrics.csv",
                output_dir / "report.png",
                title=f"{cfg.task_name}: held-out {split}",
            )
            print(f"wrote {png}")
        if cfg.get("use_the_model") and trainer.is_global_zero:
            tested = tested_checkpoint(trainer)
            if tested is not None:
                spec = cfg.use_the_model
                print_use_the_model(tested, spec.images, spec.get("query", "a red heart"), cfg.task_name)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def tested_checkpoint(trainer: L.Trainer) -> Path | None:
    """The checkpoint of the weights just tested: the recovery checkpoint written at the end of fitting."""
    for callback in trainer.callbacks:
        if isinstance(callback, RecoveryCheckpoint) and callback.path.is_file():
            return callback.path
    return None


def report_retrieval(
    table: dict[str, float], datamodule, split: str, output_dir: Path, folds: FoldTables | None = None
) -> None:
    """Print the R@K table next to chance level and write retrieval.json (with the fold tables under "folds")."""
    entries = datamodule.entries(split)
    captions = len(datamodule.gallery_captions(split))
    per_image = captions / max(len(entries), 1)
    print(f"\nRetrieval on {split} ({len(entries)} images, {captions} captions)")
    print(format_table({"model": table, "chance": chance_table(len(entries), per_image)}))
    written = dict(table)
    if folds is not None:
        size = folds.fold_size
        print(f"\nMean over {len(folds.folds)} folds of {size} images ({fold_table_prefix(split, size)}; COCO 1K)")
        print(format_table({"model": folds.mean, "chance": chance_table(size, per_image)}))
        written["folds"] = folds.to_json()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "retrieval.json").write_text(json.dumps(written, indent=2))
    print(f"wrote {output_dir / 'retrieval.json'}")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    torch.set_float32_matmul_precision("high")
    metrics, _ = train(cfg)
    return metrics.get("val/rsum")


if __name__ == "__main__":
    main()
