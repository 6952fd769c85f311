"""What the training benchmarks share: composing a run, scoring galleries, AMF counts, tables.

``bench/ablation.py``, ``bench/noise.py``, ``bench/emoji_retrieval.py`` and ``bench/evidence.py``
train with ``cots.train.train`` in their own process and read what the trained module holds;
the pieces they have in common live here so that each script keeps only its rows. Importing
this module builds nothing and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from cots.train import CONF_DIR

RETRIEVAL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")


def slug(name: str) -> str:
    """A row name as a file name: 'task KL + AMF' -> 'task_kl_amf'."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "run"


def compose_run(overrides: list[str], output_dir: Path) -> DictConfig:
    """The train config with ``overrides``, writing to ``output_dir`` (compose sets no Hydra run dir)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def amf_stats(module) -> dict:
    """AMF against the injected noise, from ``module.amf_noise_counts``; empty when AMF is off.

    The counts cover the pairs seen after the filter's warm-up (once its similarity queue is full):
    precision is the noisy share of what it filtered, recall the filtered share of the noisy pairs
    (None where the denominator is 0: nothing filtered, or no injected noise).
    """
    if module.amf is None:
        return {}
    tp, fp, fn, tn = (float(x) for x in module.amf_noise_counts)
    seen = tp + fp + fn + tn
    return {
        "amf_filtered_after_warmup": (tp + fp) / seen if seen else None,
        "amf_precision": tp / (tp + fp) if tp + fp else None,
        "amf_recall": tp / (tp + fn) if tp + fn else None,
        "amf_counts": {"filtered_noisy": tp, "filtered_clean": fp, "kept_noisy": fn, "kept_clean": tn},
    }


def score_galleries(trainer, module, datamodule, manifests: dict[str, str]) -> dict[str, dict]:
    """Held-out R@1/5/10 both ways and rsum of one trained module on each gallery manifest.

    Returns ``{name: {"manifest", "images", "captions", i2t_r1 ... rsum}}``; every gallery is
    scored by the same weights (``trainer.test`` on that manifest's image and caption loaders).
    """
    scores = {}
    for name, manifest in manifests.items():
        trainer.test(module, dataloaders=datamodule.gallery_loaders(manifest), verbose=False)
        scores[name] = {
            "manifest": str(manifest),
            "images": len(datamodule.entries(manifest)),
            "captions": len(datamodule.gallery_captions(manifest)),
            **module.last_retrieval,
            **module.last_error_accuracy,  # ViLEM's detection / correction on this gallery's captions, when on
        }
    return scores


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as a markdown table, one column per key (floats with 2 decimals, None as '–')."""

    def cell(value) -> str:
        return "–" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path, stem: str, columns: list[str], header: str) -> str:
    """``<out>/<stem>.json`` (the rows) and ``<out>/<stem>.md`` (header and table); returns the table."""
    table = markdown_table(rows, columns)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    (out / f"{stem}.md").write_text(f"{header}\n\n{table}\n")
    return table


def base_args(description: str, default_out: str) -> argparse.ArgumentParser:
    """The arguments every equal-steps bench takes: steps, output folder, experiment, overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=230, help="optimizer steps per run (the equal budget)")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="output folder")
    parser.add_argument("--experiment", default="emoji_demo", help="the experiment every run starts from")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to every run")
    return parser
