"""Noisy pairs: how well AMF finds injected caption swaps, and what it does to held-out retrieval.

    python bench/noise.py --steps 230 --out logs/bench/noise                  # experiment=emoji_demo
    python bench/noise.py --steps 3 --rates 0 0.4 --out /tmp/noise experiment=smoke   # a quick check

For each noise rate p (``data.noise_rate``: a seeded fraction p of the training captions replaced
by captions of other images) it trains twice, AMF on and off, at the same budget, and reports:

- AMF on: precision (noisy share of the filtered pairs) and recall (filtered share of the noisy
  pairs), counted over the pairs seen after the warm-up (once the similarity queue is full), and
  the fraction filtered after the warm-up;
- both: held-out R@1/5/10 both ways and rsum on ``data.test_manifest``.

Writes ``<out>/noise.md`` and ``<out>/noise.json``; each run's own files go to ``<out>/<row>/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import run_row  # noqa: E402
from runs import RETRIEVAL_KEYS, base_args, write_results  # noqa: E402

COLUMNS = ["noise_rate", "amf", "amf_precision", "amf_recall", "amf_filtered_after_warmup", *RETRIEVAL_KEYS, "minutes"]


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = base_args(__doc__.splitlines()[0], "logs/bench/noise")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.2, 0.4], help="noise rates p")
    args = parser.parse_args()
    common = [f"experiment={args.experiment}", *args.overrides, f"trainer.max_steps={args.steps}", "test=true"]
    rows = []
    header = f"# Noisy pairs: {args.steps} steps each, {' '.join(common)}"
    for rate in args.rates:
        for amf in (True, False):
            name = f"p{rate:g} amf {'on' if amf else 'off'}"
            overrides = [*common, f"++data.noise_rate={rate}", f"objective.amf.enabled={str(amf).lower()}"]
            print(f"\n=== {name}", flush=True)
            row = run_row(name, overrides, args.out)
            rows.append({"noise_rate": rate, "amf": "on" if amf else "off", **row})
            table = write_results(rows, args.out, "noise", COLUMNS, header)  # after every run: partial results survive
    print(f"\n{header}\n\n{table}\n\nwrote {args.out / 'noise.md'} and {args.out / 'noise.json'}")


if __name__ == "__main__":
    main()
