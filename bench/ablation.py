"""Ablation table: one training run per objective setting at an equal budget, held-out retrieval per row.

    python bench/ablation.py --steps 230 --out logs/bench/ablation            # experiment=emoji_demo
    python bench/ablation.py --steps 3 --out /tmp/abl experiment=smoke        # a quick check
    python bench/ablation.py --only "contrastive only" "all" ++data.noise_rate=0.2

Every row gets the same overrides apart from its own (same steps, data, seed), trains with
``cots.train.train`` in this process and is tested on ``data.test_manifest``. Writes
``<out>/ablation.md`` and ``<out>/ablation.json``; each run's own files go to ``<out>/<row>/``.
The rows are a list of override sets: a new part of the objective is one more entry.
One run per row and one seed: for several seeds, an equal wall-clock budget and resumable
runs, use ``bench/evidence.py``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from runs import RETRIEVAL_KEYS, amf_stats, base_args, compose_run, slug, write_results

from cots.train import train

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
    # the error generator as it was: the CMLM head fused with the image draws words the image supports
    (
        "+ CMLM + ViLEM, image-conditioned generator",
        ["objective=contrastive_only", *CMLM, "objective.vilem.enabled=true", "objective.vilem.generator=cmlm_image"],
    ),
]


def run_row(name: str, overrides: list[str], out: Path) -> dict:
    """Train and test one setting; the row holds the overrides, held-out retrieval and the AMF counts."""
    cfg = compose_run(overrides, out / slug(name))
    start = time.perf_counter()
    metrics, objects = train(cfg)
    module = objects["module"]
    row = {
        "setting": name,
        "overrides": overrides,
        "steps": int(objects["trainer"].global_step),
        "minutes": (time.perf_counter() - start) / 60,
        "train_loss": metrics.get("train/loss"),
    }
    row.update({key: module.last_retrieval.get(key) for key in RETRIEVAL_KEYS})
    row.update(module.last_error_accuracy)  # ViLEM detection / correction accuracy on held-out captions, when on
    row.update(amf_stats(module))  # precision / recall against injected noise, when AMF is on
    return row


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
        columns = [
            "setting",
            *RETRIEVAL_KEYS,
            "amf_filtered_after_warmup",
            "vilem_det_acc",
            "vilem_det_majority",
            "vilem_cor_acc",
            "train_loss",
            "minutes",
        ]
        header = f"# Ablation: {args.steps} steps each, {' '.join(common)}"
        table = write_results(rows, args.out, "ablation", columns, header)  # after every row: partial results survive
    print(f"\n{header}\n\n{table}\n\nwrote {args.out / 'ablation.md'} and {args.out / 'ablation.json'}")


if __name__ == "__main__":
    main()
