"""Held-out emoji retrieval per gallery vendor, default objective against contrastive only.

    python bench/emoji_retrieval.py --out logs/bench/emoji_retrieval            # experiment=emoji_demo
    python bench/emoji_retrieval.py --steps 3 --out /tmp/er trainer.limit_val_batches=0

Both settings train with the same overrides and budget (``--steps``, default the experiment's
own), then score the held-out concepts (test split: concept groups never seen in training)
on the Google and on the Twitter gallery separately: i2t and t2i R@1/5/10 and rsum.
Writes ``<out>/emoji_retrieval.md`` and ``.json``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import RETRIEVAL_KEYS, base_args, compose_run, score_galleries, slug, write_results  # noqa: E402

from cots.metrics.retrieval import chance_table  # noqa: E402
from cots.train import train  # noqa: E402

SETTINGS = [("default objective", []), ("contrastive only", ["objective=contrastive_only"])]
VENDORS = ("google", "twitter")


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = base_args(__doc__.splitlines()[0], "logs/bench/emoji_retrieval")
    parser.set_defaults(steps=None)
    args = parser.parse_args()
    common = [f"experiment={args.experiment}", *args.overrides, "test=false"]
    if args.steps:
        common.append(f"trainer.max_steps={args.steps}")
    rows: list[dict] = []
    header = f"# Held-out emoji retrieval: {' '.join(common)}"
    columns = ["setting", "gallery", "images", *RETRIEVAL_KEYS, "train_minutes"]
    for name, overrides in SETTINGS:
        print(f"\n=== {name}", flush=True)
        cfg = compose_run([*common, *overrides], args.out / slug(name))
        start = time.perf_counter()
        _, objects = train(cfg)
        minutes = (time.perf_counter() - start) / 60
        trainer, module, datamodule = objects["trainer"], objects["module"], objects["datamodule"]
        emoji_dir = Path(cfg.data.test_manifest).parent
        galleries = {vendor: str(emoji_dir / f"test_{vendor}.json") for vendor in VENDORS}
        for vendor, scores in score_galleries(trainer, module, datamodule, galleries).items():
            rows.append(
                {
                    "setting": name,
                    "gallery": vendor,
                    **{key: value for key, value in scores.items() if key not in ("manifest", "captions")},
                    "train_minutes": minutes,
                    "steps": trainer.global_step,
                }
            )
        table = write_results(rows, args.out, "emoji_retrieval", columns, header)
    chance = chance_table(rows[0]["images"], 1.0)
    rows_chance = [{"setting": "chance", "gallery": "-", "images": rows[0]["images"], **chance}]
    table = write_results(rows + rows_chance, args.out, "emoji_retrieval", columns, header)
    print(f"\n{header}\n\n{table}\n\nwrote {args.out / 'emoji_retrieval.md'}")


if __name__ == "__main__":
    main()
