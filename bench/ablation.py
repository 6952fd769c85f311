"""Ablation table: one training run per objective setting at an equal budget, held-out retrieval per row.

    python bench/ablation.py --steps 230 --out logs/bench/ablation            # experiment=emoji_demo
    python bench/ablation.py --steps 3 --out /tmp/abl experiment=smoke        # a quick check
    python bench/ablation.py --only "contrastive only" "all" ++data.noise_rate=0.2

Every row gets the same overrides apart from its own (same steps, data, seed), trains with
``cots.train.train`` in this process and is tested on ``data.test_manifest``. Writes
``<out>/ablation.md`` and ``<out>/ablation.json``; each run's own files go to ``<out>/<row>/``.
The rows are a list of override sets: a new part of the objective is one more entry.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from cots.train import CONF_DIR, train

MVLM = ["data=emoji_tokens", "objective.cmvm.enabled=true", "objective.cmlm.enabled=true"]
# ViLEM draws its errors from the CMLM head, so its row and its baseline both train CMLM.
CMLM = ["data.text_mask={mask_prob:0.15,replace_prob:0.8,random_prob:0.1}", "objective.cmlm.enabled=true"]
SETTINGS: list[tuple[str, list[str]]] = [
    ("contrastive only", ["objective=contrastive_only"]),
    ("+ MVLM", ["objective=contrastive_only", *MVLM]),
    ("+ task KL", ["objective=contrastive_only", "objective.task.enabled=true"]),
    ("+ AMF", ["objective=contrastive_only", "objective.amf.enabled=true"]),
    ("task KL + AMF", ["objective=default"]),
    ("all", ["objective=default", *MVLM]),
    ("+ CMLM", ["objective=contrastive_only", *CMLM]),
    ("+ CMLM + ViLEM", ["objective=contrastive_only", *CMLM, "objective.vilem.enabled=true"]),
]
RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "run"


def compose_run(overrides: list[str], output_dir: Path) -> DictConfig:
    """The train config with ``overrides``, writing to ``output_dir`` (compose sets no Hydra run dir)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def run_row(name: str, overrides: list[str], out: Path) -> dict:
    """Train and test one setting; the row holds the overrides, held-out retrieval and the AMF counts."""
    cfg = compose_run(overrides, out / slug(name))
    start = time.perf_counter()
    metrics, objects = train(cfg)
    module = objects["module"]
    row = {"setting": name, "overrides": overrides, "steps": int(objects["trainer"].global_step),
           "minutes": (time.perf_counter() - start) / 60, "train_loss": metrics.get("train/loss")}
    row.update({key: module.last_retrieval.get(key) for key in RETRIEVAL_KEYS})
    row.update(module.last_error_accuracy)  # ViLEM detection / correction accuracy on held-out captions, when on
    if module.objective.amf is not None:
        tp, fp, fn, tn = (float(x) for x in module.amf_noise_counts)
        seen = tp + fp + fn + tn  # pairs seen after the warm-up (Q^s full)
        row["amf_filtered_after_warmup"] = (tp + fp) / seen if seen else None
        row["amf_precision"] = tp / (tp + fp) if tp + fp else None
        row["amf_recall"] = tp / (tp + fn) if tp + fn else None
        row["amf_counts"] = {"filtered_noisy": tp, "filtered_clean": fp, "kept_noisy": fn, "kept_clean": tn}
    return row


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path, stem: str, columns: list[str], header: str) -> str:
    table = markdown_table(rows, columns)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{stem}.md").write_text(f"{header}\n\n{table}\n")
    return table


def base_args(description: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=230, help="optimizer steps per run (the equal budget)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument("--experiment", default="emoji_demo", help="the experiment every run starts from")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    return parser


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = base_args(__doc__.splitlines()[0], "logs/bench/ablation")
    parser.add_argument("--only", nargs="+", metavar="SETTING", help="run only these rows (by name)")
    args = parser.parse_args()
    settings = [(n, o) for n, o in SETTINGS if not args.only or n in args.only]
    if not settings:
        parser.error(f"--only matches none of {[n for n, _ in SETTINGS]}")
    common = [f"experiment={args.experiment}", *args.overrides, f"trainer.max_steps={args.steps}", "test=true"]
    rows = []
    for name, overrides in settings:
        print(f"\n=== {name}: {' '.join(overrides)}", flush=True)
        rows.append(run_row(name, [*common, *overrides], args.out))
        columns = ["setting", *RETRIEVAL_KEYS, "amf_filtered_after_warmup", "vilem_det_acc", "vilem_det_majority",
                   "vilem_cor_acc", "train_loss", "minutes"]
        header = f"# Ablation: {args.steps} steps each, {' '.join(common)}"
        table = write_results(rows, args.out, "ablation", columns, header)  # after every row: partial results survive
    print(f"\n{header}\n\n{table}\n\nwrote {args.out / 'ablation.md'} and {args.out / 'ablation.json'}")


if __name__ == "__main__":
    main()
