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

Second table: the same random batches (no buckets) encoded in k length groups inside the tower
(``model.encoder.text_tower.length_groups``, ``--groups``): tokens the tower runs on per caption, and with
``--time`` the tower's forward + backward on the first ``--timed-batches`` real batches (their captions'
ids), mean ms a batch. The batches stay random samples; only the work changes.
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


def epoch_batches(lengths: torch.Tensor, batch_size: int, buckets: int, epochs: int, seed: int) -> list[torch.Tensor]:
    """The sample indices (B,) of every batch of ``epochs`` epochs of the training order."""
    sampler = ShardedEpochSampler(
        len(lengths), seed=seed, batch_size=batch_size, lengths=lengths.tolist(), length_buckets=buckets
    )
    batches = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        order = torch.tensor([index for index, _ in sampler])
        batches += list(order.split(batch_size))
    return batches


def grouped_tokens(lengths: torch.Tensor, groups: int) -> int:
    """Tokens a batch of these caption lengths costs in ``groups`` groups, each padded to its longest."""
    return sum(int(group.max()) * len(group) for group in lengths.sort().values.chunk(groups))


def grouped_tower_ms(cfg, tokenizer, captions: list[str], batches, groups: list[int], warmup: int) -> dict[int, float]:
    """Mean ms of the text tower's forward + backward over ``batches`` of real captions, per group count."""
    tower = instantiate(cfg.model.encoder.text_tower, vocab_size=tokenizer.vocab_size).train()
    encoded = [tokenizer([captions[i] for i in batch.tolist()]) for batch in batches]
    result = {}
    for k in groups:
        tower.length_groups = k

        def step(k: int = k) -> None:
            for ids, mask in encoded:
                tower.zero_grad(set_to_none=True)
                pooled, _ = tower(ids, mask)
                pooled.float().pow(2).mean().backward()

        seconds = statistics.median(time_calls(step, "cpu", warmup, 3))
        result[k] = 1000 * seconds / len(encoded)
        print(f"  text tower in {k} length group(s): {result[k]:.1f} ms a batch", flush=True)
    return result


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
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4, 8], help="length groups in the tower")
    parser.add_argument("--timed-batches", type=int, default=12, help="real batches timed per group count")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="JSON of the figures")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: experiment=emoji_demo)")
    args = parser.parse_args(argv)
    args.buckets = [0, *(b for b in args.buckets if b > 1)]  # the rows are compared with no buckets
    args.groups = [1, *(k for k in args.groups if k > 1)]
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
        batches = [lengths[b] for b in epoch_batches(lengths, batch, buckets, args.epochs, int(cfg.seed))]
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
    random_batches = epoch_batches(lengths, batch, 0, args.epochs, int(cfg.seed))
    group_rows = [
        {
            "groups": k,
            "tokens_per_caption": statistics.fmean(grouped_tokens(lengths[b], k) for b in random_batches) / batch,
        }
        for k in args.groups
    ]
    if args.time:
        timed = grouped_tower_ms(cfg, tokenizer, captions, random_batches[: args.timed_batches], args.groups, 1)
        for row in group_rows:
            row["text_ms_per_step"] = timed[row["groups"]]
            row["text_speedup"] = timed[1] / timed[row["groups"]]
    group_columns = [("length groups in the tower", "groups", ""), ("tokens per caption", "tokens_per_caption", ".2f")]
    if args.time:
        group_columns += [("text tower fwd+bwd, ms/batch", "text_ms_per_step", ".0f"), ("vs 1", "text_speedup", ".2f")]
    print()
    print(markdown_table(group_rows, group_columns))
    result = {
        "overrides": overrides,
        "captions": len(captions),
        "mean_tokens": lengths.float().mean().item(),
        "batch_size": batch,
        "epochs": args.epochs,
        "rows": [{k: v for k, v in r.items() if k != "padded"} for r in rows],
        "length_groups": group_rows,
        "machine": machine_info("cpu"),
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(main() and 0)
