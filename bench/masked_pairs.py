"""What the token level's masked passes cost, by ``objective.masked_pairs``, on real emoji batches.

    python bench/masked_pairs.py                          # experiment=emoji_mvlm, needs data/emoji (make emoji-data)
    python bench/masked_pairs.py --out logs/bench/masked_pairs.json --steps 8

Each row times the training step (``cots.training_step``) + backward under the experiment's bf16 autocast
(no optimizer, no EMA),
median of ``--steps`` after one warm-up, twice: on one batch repeated (every shape the same each step)
and on successive batches of the train loader (block masks, masked-word counts and caption lengths
change each step, as in training): a gap between the two columns would be what changing shapes cost
(the heads score only the masked positions, so their matmuls see a new row count every step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import autocast, compose_config, machine_info, markdown_table, time_calls, write_json  # noqa: E402

from cots.train import build_module  # noqa: E402

SETTINGS = [
    ("token level off", None, False),
    ("8 pairs", 8, True),
    ("16 pairs", 16, True),
    ("32 pairs", 32, True),
    ("all pairs", None, True),
]


def time_step(model, training_step, batches: list[dict], params: list[torch.Tensor]) -> float:
    """Median ms of forward + objective + backward over ``batches[1:]`` (the first is a warm-up)."""
    batch_stream = iter(batches)

    def step() -> None:
        with autocast("cpu", "bf16"):
            loss = training_step(model, next(batch_stream)).terms["loss"]
        loss.backward()
        for param in params:
            param.grad = None

    return 1000 * statistics.median(time_calls(step, "cpu", 1, len(batches) - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="emoji_mvlm")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    from hydra.utils import instantiate

    cfg = compose_config(
        [
            f"experiment={args.experiment}",
            "paths.output_dir=/tmp/cots-bench-masked-pairs",
            "paths.log_dir=/tmp/cots-bench-masked-pairs",
            *args.overrides,
        ]
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    tokenizer = datamodule.build_text_tokenizer(None)
    torch.manual_seed(cfg.seed)
    module = build_module(cfg, tokenizer.vocab_size, tokenizer.to_str(), tokenizer.mask_id, tokenizer.special_ids)
    model, objective = module.model.train(), module.step.objective
    if not objective.token_level:
        raise SystemExit(f"experiment={args.experiment} has no token level (objective.cmvm / objective.cmlm)")
    loader = iter(datamodule.train_dataloader())
    batches = [next(loader) for _ in range(args.steps + 1)]
    del loader  # its worker would keep prefetching while the rows are timed
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for name, pairs, token_level in SETTINGS:
        objective.masked_pairs = pairs
        cmvm, cmlm = objective.cmvm.enabled, objective.cmlm.enabled
        objective.cmvm.enabled, objective.cmlm.enabled = cmvm and token_level, cmlm and token_level
        same = time_step(model, module.step, [batches[0]] * (args.steps + 1), params)
        changing = time_step(model, module.step, batches, params)
        objective.cmvm.enabled, objective.cmlm.enabled = cmvm, cmlm
        rows.append({"setting": name, "same_batch_ms": same, "successive_batches_ms": changing})
        print(rows[-1], flush=True)
    base = rows[0]
    for row in rows:
        row["same_extra_ms"] = row["same_batch_ms"] - base["same_batch_ms"]
        row["successive_extra_ms"] = row["successive_batches_ms"] - base["successive_batches_ms"]
    table = markdown_table(
        rows,
        [
            ("masked passes", "setting", ""),
            ("one batch, ms", "same_batch_ms", ".0f"),
            ("+ vs off", "same_extra_ms", "+.0f"),
            ("successive batches, ms", "successive_batches_ms", ".0f"),
            ("+ vs off", "successive_extra_ms", "+.0f"),
        ],
    )
    header = (
        f"experiment={args.experiment}, batch {cfg.data.batch_size}, bf16 autocast, forward + backward, "
        f"median of {args.steps}"
    )
    print(f"\n{header}\n\n{table}")
    write_json(args.out, {"header": header, "rows": rows, "table": table, "machine": machine_info("cpu")})


if __name__ == "__main__":
    main()
