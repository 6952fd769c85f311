"""Each speed switch of the training step, off against on, in one run on one machine.

    python bench/switches.py                                  # emoji shape, CPU, bf16 autocast
    python bench/switches.py --compile                        # + a row with the towers under torch.compile
    python bench/switches.py --device cuda --shape paper module.compile=null   # on a GPU, eager rows
    python bench/switches.py --out logs/bench/switches.json

Rows, each the full COTS step of ``bench/step_speed.py`` (forward, objective, backward, AdamW, EMA) with
one thing changed against the first row, the shape's experiment as configured: SDPA attention in
both towers, the ``_foreach`` EMA, and the experiment's AdamW (``emoji_demo``: fused).
The first row is measured again last, so that the drift of the machine during the run is in the table.
Micro rows time the pieces that a whole step hides in its noise: one EMA update of the model's
parameters (``_foreach`` against a per-tensor loop) and one ``optimizer.step`` (per-tensor loop,
``foreach``, ``fused``), on the same parameters. The token cache against the online dVAE is
``bench/step_speed.py`` with ``data=emoji_tokens objective=mvlm data.image_tokens.source=cache|online``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import (  # noqa: E402
    PeakMemory,
    compose_config,
    machine_info,
    markdown_table,
    release_freed_memory,
    time_calls,
    write_json,
)
from step_speed import SHAPES, _vocab_size, build_full, fill_from_tokenizer, random_batch  # noqa: E402


def eager_attention(model) -> None:
    """Both towers back to attention written out as matmul + softmax (timm ``fused_attn``, BERT 'eager')."""
    for encoder in (model.encoder, model.momentum_encoder):
        for module in encoder.image_tower.modules():
            if hasattr(module, "fused_attn"):
                module.fused_attn = False
        encoder.text_tower.bert.set_attn_implementation("eager")


@torch.no_grad()
def ema_loop_(targets: list[torch.Tensor], sources: list[torch.Tensor], m: float) -> None:
    """The EMA one tensor at a time: what ``cots.momentum.ema_update_`` does with ``_foreach`` kernels."""
    for target, source in zip(targets, sources, strict=True):
        target.mul_(m).add_(source, alpha=1.0 - m)


@contextmanager
def ema_as_loop() -> Iterator[None]:
    import cots.models.cots_model as cots_model

    original = cots_model.ema_update_
    cots_model.ema_update_ = ema_loop_
    try:
        yield
    finally:
        cots_model.ema_update_ = original


# (row name, Hydra overrides, a change to the built model or None, a context the step runs in or None)
VARIANTS: list[tuple[str, list[str], Callable | None, Callable | None]] = [
    ("as configured", [], None, None),
    ("eager attention in both towers", [], eager_attention, None),
    ("EMA as a per-tensor loop", [], None, ema_as_loop),
    ("AdamW foreach (torch's default)", ["optim.optimizer.fused=null"], None, None),
    ("AdamW per-tensor loop", ["optim.optimizer.fused=null", "+optim.optimizer.foreach=false"], None, None),
    ("AdamW fused", ["optim.optimizer.fused=true"], None, None),
    (
        "activation checkpointing, both towers",
        ["model.encoder.image_tower.grad_checkpointing=true", "model.encoder.text_tower.grad_checkpointing=true"],
        None,
        None,
    ),
]
COMPILED = ("towers under torch.compile", ["module.compile={}"], None, None)
BASELINE_AGAIN = ("as configured, measured again last", [], None, None)


def measure_variant(name, overrides, change, context, base_overrides, args) -> dict:
    cfg = compose_config(base_overrides + overrides)
    fill_from_tokenizer(cfg)
    batch = random_batch(args.batch_size, int(cfg.data.image_size), args.text_len, _vocab_size(cfg), args.device)
    with PeakMemory(args.device) as memory, context() if context else nullcontext():
        phase = build_full(cfg, batch, args.device, args.precision)
        if change is not None:
            change(phase.objects[0])
        seconds = time_calls(phase.step, args.device, args.warmup, args.steps)
    row = {
        "variant": name,
        "overrides": overrides,
        "median_s": statistics.median(seconds),
        "seconds": seconds,
        **memory.as_dict(),
    }
    print(f"  {name}: {row['median_s'] * 1e3:.1f} ms/step, peak +{row['peak_mem_mb']:.0f} MB", flush=True)
    del phase
    release_freed_memory()
    return row


def micro_rows(base_overrides: list[str], args) -> list[dict]:
    """One EMA update and one AdamW step over the model's trainable parameters, each way."""
    from hydra.utils import instantiate

    from cots.momentum import ema_update_, parameter_pairs

    cfg = compose_config(base_overrides)
    fill_from_tokenizer(cfg)
    model = instantiate(cfg.model).to(args.device)
    targets, sources = parameter_pairs(model.encoder, model.momentum_encoder)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    numel = sum(p.numel() for p in params)
    rows = []

    def add(name: str, fn: Callable[[], object]) -> None:
        seconds = time_calls(fn, args.device, 3, args.micro_steps)
        rows.append(
            {
                "variant": name,
                "median_s": statistics.median(seconds),
                "seconds": seconds,
                "tensors": len(params),
                "params": numel,
            }
        )
        print(f"  {name}: {rows[-1]['median_s'] * 1e3:.2f} ms", flush=True)

    add("EMA update, _foreach (cots.momentum)", lambda: ema_update_(targets, sources, 0.995))
    add("EMA update, per-tensor loop", lambda: ema_loop_(targets, sources, 0.995))
    for label, options in (
        ("per-tensor loop", {"foreach": False}),
        ("foreach (torch's default)", {"foreach": True}),
        ("fused", {"fused": True}),
    ):
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.02, **options)
        add(f"AdamW step, {label}", optimizer.step)
        del optimizer
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="emoji")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the shape's data.batch_size")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-steps", type=int, default=20)
    parser.add_argument(
        "--compile", action="store_true", help="add a row with module.compile={} (compiles for minutes)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="depth-1 towers, batch 4, 1 + 2 steps: checks the script"
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = parser.parse_intermixed_args(argv)
    release_freed_memory()
    base = SHAPES[args.shape].overrides + args.overrides
    if args.dry_run:
        from step_speed import DRY_RUN_BATCH, DRY_RUN_OVERRIDES

        base += DRY_RUN_OVERRIDES
        args.batch_size, args.warmup, args.steps, args.micro_steps = DRY_RUN_BATCH, 1, 2, 2
    if args.batch_size is None:
        args.batch_size = SHAPES[args.shape].batch or int(compose_config(base).data.batch_size)
    print(
        f"[{args.shape}] batch {args.batch_size}, {args.text_len} tokens, {args.precision} on {args.device}; "
        f"{args.warmup} warm-up + {args.steps} timed steps per row",
        flush=True,
    )

    variants = VARIANTS + ([COMPILED] if args.compile else []) + [BASELINE_AGAIN]
    rows = [measure_variant(*variant, base, args) for variant in variants]
    configured = rows[0]["median_s"]
    for row in rows:
        row["vs_configured"] = row["median_s"] / configured
    micro = micro_rows(base, args)

    view = [{**r, "ms": r["median_s"] * 1e3} for r in rows]
    table = markdown_table(
        view,
        [
            ("full step", "variant", ""),
            ("ms/step (median)", "ms", ".1f"),
            ("vs as configured", "vs_configured", ".3f"),
            ("peak mem MB", "peak_mem_mb", ".0f"),
        ],
    )
    micro_table = markdown_table(
        [{**r, "ms": r["median_s"] * 1e3} for r in micro],
        [("piece", "variant", ""), ("ms (median)", "ms", ".2f"), ("tensors", "tensors", "d")],
    )
    print(
        f"\n{table}\n\n{micro_table}\n(micro rows: {micro[0]['params'] / 1e6:.1f} M trainable parameters, "
        f"median of {args.micro_steps} calls)"
    )
    result = {
        "machine": machine_info(args.device),
        "args": vars(args),
        "rows": rows,
        "micro": micro,
        "table": table,
        "micro_table": micro_table,
    }
    write_json(args.out, result)
    if args.out is not None:
        header = f"# Speed switches: {args.shape} shape, batch {args.batch_size}, {args.precision} on {args.device}"
        args.out.with_suffix(".md").write_text(f"{header}\n\n{table}\n\n{micro_table}\n")
    return result


if __name__ == "__main__":
    main()
