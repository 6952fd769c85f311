"""Padding of the training batches with and without length buckets (``data.length_buckets``), and what it costs.

    python bench/length_buckets.py                              # the demo's pairs, batch 64, buckets 0 4 8 16 32
    python bench/length_buckets.py --time                       # + the text tower's forward + backward per batch
    python bench/length_buckets.py --buckets 0 16 --epochs 5 data.batch_size=128 --out logs/bench/buckets.json

A batch is padded to its longest caption, so the text tower runs on B x (longest caption) tokens. For each
bucket size the training order of ``--epochs`` epochs (``cots.data.sampler.ShardedEpochSampler``, as
training draws it) gives each batch's padded length; printed: the mean padded length, its 10th / 50th /
90th percentiles over the batches, and the share of the tower's tokens that are real (not padding).
``--time`` times the text tower (the config's: the demo's pretrained MiniLM) forward + backward on a batch
of each padded length seen, then the mean over the epoch's batches: the text work a step saves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from measure import compose_config, machine_info, markdown_table, time_calls, write_json

from cots.data.sampler import ShardedEpochSampler


def padded_lengths(lengths: torch.Tensor, batch_size: int, buckets: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The caption lengths (B,) of every batch of ``epochs`` epochs of the training order."""
    sampler = ShardedEpochSampler(
        len(lengths), seed=seed, batch_size=batch_size, lengths=lengths.tolist(), length_buckets=buckets
    )
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor([index for index, _ in sampler])
        batches += [lengths[batch] for batch in order.split(batch_size)]
    return batches


def text_tower_seconds(cfg, tokenizer, batch_size: int, widths: set[int], warmup: int, steps: int) -> dict[int, float]:
    """Median seconds of the text tower's forward + backward on a (batch_size, width) batch, per width."""
    tower = instantiate(cfg.model.encoder.text_tower, vocab_size=tokenizer.vocab_size).train()
    seconds = {}
    for width in sorted(widths):
        ids = torch.randint(1000, tokenizer.vocab_size, (batch_size, width))
        mask = torch.ones_like(ids)

        def step(ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> None:
            tower.zero_grad(set_to_none=True)
            pooled, _ = tower(ids, mask)
            pooled.float().pow(2).mean().backward()

        seconds[width] = statistics.median(time_calls(step, "cpu", warmup, steps))
        print(f"  text tower, batch {batch_size} x {width} tokens: {1000 * seconds[width]:.1f} ms", flush=True)
    return seconds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--buckets", type=int, nargs="+", default=[0, 4, 8, 16, 32], help="global batches per bucket")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--time", action="store_true", help="time the text tower at each padded length")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON of the figures")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=emoji_demo)")
    args = parser.parse_args(argv)
    args.buckets = [0, *(b for b in args.buckets if b > 1)]  # the rows are compared with no buckets
    overrides = (
        args.overrides
        if any(o.startswith("experiment=") for o in args.overrides)
        else ["experiment=emoji_demo", *args.overrides]
    )
    cfg = compose_config(overrides)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    tokenizer = datamodule.build_text_tokenizer()
    captions = datamodule._train_pairs().captions()
    lengths = torch.tensor(tokenizer.lengths(captions))
    batch = datamodule.batch_size
    print(
        f"{len(captions)} training captions ({cfg.data.train_manifest}): {lengths.float().mean():.2f} tokens on "
        f"average, median {lengths.median().item()}, max {lengths.max().item()}; batch {batch}",
        flush=True,
    )
    rows = []
    for buckets in args.buckets:
        batches = padded_lengths(lengths, batch, buckets, args.epochs, int(cfg.seed))
        padded = [int(b.max()) for b in batches]
        deciles = statistics.quantiles(padded, n=10)
        rows.append(
            {
                "buckets": buckets or "off",
                "padded_mean": statistics.fmean(padded),
                "padded_p10": deciles[0],
                "padded_median": statistics.median(padded),
                "padded_p90": deciles[-1],
                "real_share": sum(int(b.sum()) for b in batches) / (batch * sum(padded)),
                "padded": padded,
            }
        )
    if args.time:
        seconds = text_tower_seconds(
            cfg, tokenizer, batch, {w for r in rows for w in r["padded"]}, args.warmup, args.steps
        )
        for row in rows:
            row["text_ms_per_step"] = 1000 * statistics.fmean(seconds[w] for w in row["padded"])
        off = rows[0]["text_ms_per_step"]
        for row in rows:
            row["text_speedup"] = off / row["text_ms_per_step"]
    columns = [
        ("buckets (global batches)", "buckets", ""),
        ("padded length, mean", "padded_mean", ".2f"),
        ("p10", "padded_p10", ".1f"),
        ("median", "padded_median", ".1f"),
        ("p90", "padded_p90", ".1f"),
        ("real tokens", "real_share", ".1%"),
    ]
    if args.time:
        columns += [("text tower fwd+bwd, ms/step", "text_ms_per_step", ".0f"), ("vs off", "text_speedup", ".2f")]
    print(markdown_table(rows, columns))
    result = {
        "overrides": overrides,
        "captions": len(captions),
        "mean_tokens": lengths.float().mean().item(),
        "batch_size": batch,
        "epochs": args.epochs,
        "rows": [{k: v for k, v in r.items() if k != "padded"} for r in rows],
        "machine": machine_info("cpu"),
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
