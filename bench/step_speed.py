"""Training-step benchmark: the full COTS objective against a plain in-batch CLIP step on the same towers.

    python bench/step_speed.py                                     # emoji and large shapes, CPU fp32
    python bench/step_speed.py --shapes emoji --steps 10 --out logs/bench/step_emoji.json
    python bench/step_speed.py --device cuda --precision bf16 --shapes paper --warmup 10 --steps 20
    python bench/step_speed.py --shapes paper --dry-run            # depth-1 towers, batch 4: checks the script
    python bench/step_speed.py --shapes emoji objective=contrastive_only   # extra Hydra overrides for every shape
    python bench/step_speed.py --shapes emoji objective=vilem              # + CMLM + ViLEM error modeling
    python bench/step_speed.py --shapes emoji --precision bf16 "module.compile={}"   # towers under torch.compile

Both steps are built from the composed Hydra config (``hydra.utils.instantiate``) and run in this
process on the same random batch. The full step is ``cots.training_step.TrainingStep`` (what
``COTSLitModule.training_step`` runs) + its optimizer step without Lightning: forward (online + momentum)
-> AMF filter -> masked passes (when CMVM / CMLM are on; cached-style random dVAE tokens) -> ViLEM edits
(when on) -> objective
(every enabled term) -> enqueue -> backward -> AdamW -> momentum update. The CLIP step encodes both sides with the same
online towers, takes the symmetric InfoNCE over the batch with the learnable temperature and steps
AdamW (no momentum encoder, no queue). For each: median seconds per step after the warm-up, pairs/s,
peak memory (see ``measure.PeakMemory``), FLOPs of one step (``FlopCounterMode``), achieved FLOP/s and
its ratio to a large ``torch.mm`` measured in the same run (fp32, or bf16 under autocast), plus the
issue's overhead ratio ``full_time / (full_flops / clip_flops x clip_time)`` (target <= 1.1).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from measure import (
    PeakMemory,
    autocast,
    compose_config,
    count_flops,
    machine_info,
    markdown_table,
    matmul_rate,
    release_freed_memory,
    si,
    time_calls,
    write_json,
)
from torch import nn


@dataclass
class Shape:
    """A benchmark shape: Hydra overrides and the batch (None = ``data.batch_size`` of the config)."""

    overrides: list[str]
    batch: int | None = None
    note: str = ""


SHAPES = {
    "emoji": Shape(
        ["experiment=emoji_demo", "model.queue_size=4096"], batch=128, note="ViT 64px/8 w256 d6 + MiniLM-L6, K=4096"
    ),
    "large": Shape(
        [
            "experiment=emoji_demo",
            "data.image_size=128",
            "model.encoder.image_tower.patch_size=16",
            "model.encoder.image_tower.embed_dim=384",
            "model.encoder.image_tower.depth=12",
            "model.encoder.image_tower.num_heads=6",
        ],
        batch=64,
        note="ViT-S-ish 128px/16 w384 d12 + MiniLM-L6, K=4096",
    ),
    "paper": Shape(["experiment=cots_vitb384"], note="ViT-B/16 384px + BERT-base (scratch), K=65536"),
}
# --dry-run: one block per tower and a tiny batch, to check the script end to end anywhere.
DRY_RUN_OVERRIDES = ["model.encoder.image_tower.depth=1", "model.encoder.text_tower.num_layers=1"]
DRY_RUN_BATCH = 4


@dataclass
class Batch:
    images: torch.Tensor  # B x 3 x H x W, roughly normalised
    input_ids: torch.Tensor  # B x L
    attention_mask: torch.Tensor  # B x L, 1 for real tokens; the longest caption fills L


def random_batch(batch: int, image_size: int, text_len: int, vocab_size: int, device: str, seed: int = 0) -> Batch:
    """Random pairs of the right shapes: [CLS] words [SEP] [PAD]..., lengths from L/2 to L (padded to the longest)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=gen)
    lengths = torch.randint(max(text_len // 2, 2), text_len + 1, (batch,), generator=gen)
    lengths[0] = text_len
    low = min(1000, vocab_size // 2)
    input_ids = torch.randint(low, vocab_size, (batch, text_len), generator=gen)
    positions = torch.arange(text_len)[None, :]
    cls_id, sep_id = (101, 102) if vocab_size > 102 else (1, 2)  # BERT's ids where the vocabulary has them
    input_ids[:, 0] = cls_id
    input_ids[positions == (lengths[:, None] - 1)] = sep_id
    attention_mask = (positions < lengths[:, None]).long()
    input_ids = input_ids * attention_mask  # [PAD] = 0
    return Batch(images.to(device), input_ids.to(device), attention_mask.to(device))


class CLIPStep(nn.Module):
    """The peer: the same online towers, symmetric in-batch InfoNCE, learnable temperature."""

    def __init__(self, encoder: nn.Module, temperature: float) -> None:
        super().__init__()
        from cots.models.cots_model import TEMPERATURE_MAX, TEMPERATURE_MIN

        self.encoder = encoder
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.bounds = (TEMPERATURE_MIN, TEMPERATURE_MAX)

    def forward(self, batch: Batch) -> torch.Tensor:
        image = self.encoder.encode_image(batch.images).embedding  # B x D
        text = self.encoder.encode_text(batch.input_ids, batch.attention_mask).embedding  # B x D
        logits = image.float() @ text.float().t() / self.log_temperature.exp().clamp(*self.bounds)  # B x B
        labels = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@dataclass
class Phase:
    """One step kind being measured: a callable doing a whole training step, and its objects."""

    name: str
    step: Callable[[], torch.Tensor]
    objects: list = field(default_factory=list)
    trainable: int = 0


def make_optimizer(cfg, module: nn.Module) -> torch.optim.Optimizer:
    """AdamW as ``configure_optimizers`` builds it: the config's partial over ``param_groups``."""
    from hydra.utils import instantiate

    from cots.optim import build_optimizer

    factory = instantiate(cfg.optim.optimizer)
    return build_optimizer(factory, module, cfg.optim.get("lr_scale"))


def text_special_ids(vocab: int) -> tuple[int, list[int]]:
    """([MASK], special ids) of the random captions: BERT's where the vocabulary has them (see random_batch)."""
    return (103 if vocab > 103 else 3), [0, 1, 2, 101, 102]


def mvlm_fields(cfg, model, objective, batch: Batch) -> dict:
    """What the data module adds for CMVM / CMLM: random dVAE tokens (as from the token cache) or,
    with ``data.image_tokens.source=online``, random dVAE-resolution crops that the step tokenises;
    BEiT block masks and BERT-masked captions; empty when both terms are off."""
    from cots.masking import BlockMaskGenerator, TextMasker, block_masks, sample_rng

    fields, (size, device) = {}, (batch.images.shape[0], batch.images.device)
    gen = torch.Generator().manual_seed(1)
    if objective.cmvm.enabled:
        grid = model.encoder.image_tower.grid_size
        vocab = int(cfg.data.image_tokens.vocab_size)
        if cfg.data.image_tokens.get("source") == "online":  # the dVAE runs inside the step
            side = int(cfg.data.image_tokens.dvae_input_size)
            fields["images_dvae"] = torch.rand(size, 3, side, side, generator=gen).to(device)  # B x 3 x s x s in [0, 1]
        else:
            fields["image_tokens"] = torch.randint(vocab, (size, *grid), generator=gen).to(device)  # B x h x w
        masks = BlockMaskGenerator(grid, **cfg.data.image_tokens.block_mask)
        fields["patch_mask"] = block_masks(masks, size, sample_rng(0)).to(device)  # B x P
    if objective.cmlm.enabled:
        vocab = model.encoder.text_tower.vocab_size
        masker = TextMasker(*text_special_ids(vocab), vocab)
        ids, labels = masker(batch.input_ids.cpu(), batch.attention_mask.cpu(), gen)
        fields["mlm_input_ids"], fields["mlm_labels"] = ids.to(device), labels.to(device)  # B x L each
    return fields


def build_full(cfg, batch: Batch, device: str, precision: str) -> Phase:
    """COTSModel + the training step + AdamW: what ``COTSLitModule`` runs (``cots.training_step``), without
    Lightning."""
    from hydra.utils import instantiate

    from cots.training_step import TrainingStep

    torch.manual_seed(0)
    model = instantiate(cfg.model).to(device).train()
    if cfg.module.get("compile") is not None:  # module.compile={...}: what COTSLitModule does
        model.compile_towers(**cfg.module.compile)
    training_step = TrainingStep.from_config(instantiate(cfg.objective), cfg.data.get("image_tokens"))
    objective = training_step.objective
    if training_step.amf is not None:
        training_step.amf.to(device)
    optimizer = make_optimizer(cfg, model)
    momentum = float(cfg.module.momentum)
    inputs = {
        "images": batch.images,
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        **mvlm_fields(cfg, model, objective, batch),
    }

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            out = training_step(model, inputs)  # forward -> filter -> targets -> masked passes -> edits -> objective
        training_step.enqueue(model, out)
        out.terms["loss"].backward()
        optimizer.step()
        model.momentum_update(momentum)
        return out.terms["loss"].detach()

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Phase("full", step, [model, training_step, optimizer], trainable)


def build_clip(cfg, batch: Batch, device: str, precision: str) -> Phase:
    """The same towers (``cfg.model.encoder``) in a CLIP step with AdamW."""
    from hydra.utils import instantiate

    torch.manual_seed(0)
    clip = CLIPStep(instantiate(cfg.model.encoder), float(cfg.model.temperature)).to(device).train()
    if cfg.module.get("compile") is not None:  # the same towers compiled the same way
        clip.encoder.image_tower.compile(**cfg.module.compile)
        clip.encoder.text_tower.compile(**cfg.module.compile)
    optimizer = make_optimizer(cfg, clip)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = clip(batch)
        loss.backward()
        optimizer.step()
        return loss.detach()

    trainable = sum(p.numel() for p in clip.parameters() if p.requires_grad)
    return Phase("clip", step, [clip, optimizer], trainable)


def tower_details(cfg) -> dict:
    enc = cfg.model.encoder
    return {
        "image_size": cfg.data.image_size,
        "image_tower": dict(enc.image_tower),
        "text_tower": dict(enc.text_tower),
        "queue_size": cfg.model.queue_size,
        "objective": {k: dict(v) for k, v in cfg.objective.items() if k != "_target_" and hasattr(v, "items")},
    }


def fused_attention(phase: Phase) -> dict:
    """Which attention kernels the towers use (timm ``fused_attn``; transformers ``_attn_implementation``)."""
    module = phase.objects[0]
    encoder = module.encoder
    vit_attn = encoder.image_tower.vit.blocks[0].attn
    return {
        "timm_fused_attn": bool(getattr(vit_attn, "fused_attn", False)),
        "bert_attn_implementation": getattr(encoder.text_tower.bert.config, "_attn_implementation", None),
    }


def measure_phase(build, cfg, batch: Batch, args, name: str) -> dict:
    """Build one step kind, time it, read its peak memory, count its FLOPs, free it."""
    with PeakMemory(args.device) as memory:
        phase = build(cfg, batch, args.device, args.precision)
        seconds = time_calls(phase.step, args.device, args.warmup, args.steps)
    flops, by_op, loss = count_flops(phase.step)
    row = {
        "step": phase.name,
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "max_s": max(seconds),
        "seconds": seconds,
        "flops": flops,
        "flops_by_op": by_op,
        "trainable_params": phase.trainable,
        "loss": float(loss),
        **memory.as_dict(),
        **fused_attention(phase),
    }
    optimizer = phase.objects[-1]
    row["optimizer"] = {
        k: v for k, v in optimizer.defaults.items() if isinstance(v, (bool, float, int, tuple, type(None)))
    }
    del phase, optimizer
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
    print(
        f"  {name} {row['step']}: {row['median_s'] * 1e3:.1f} ms/step, {si(flops, 'FLOP')}/step, "
        f"peak +{row['peak_mem_mb']:.0f} MB",
        flush=True,
    )
    return row


def run_shape(name: str, args) -> list[dict]:
    shape = SHAPES[name]
    overrides = shape.overrides + (DRY_RUN_OVERRIDES if args.dry_run else []) + args.overrides
    cfg = compose_config(overrides)
    import cots.models.cots_model  # noqa: F401  (imported before the first phase, so that its memory is not the phase's)
    import cots.objective  # noqa: F401

    fill_from_tokenizer(cfg)
    batch_size = args.batch or (DRY_RUN_BATCH if args.dry_run else shape.batch) or int(cfg.data.batch_size)
    text_len = min(args.text_len, int(cfg.data.text_tokenizer.max_length))
    vocab = _vocab_size(cfg)
    batch = random_batch(batch_size, int(cfg.data.image_size), text_len, vocab, args.device)
    print(
        f"[{name}] batch {batch_size}, {cfg.data.image_size}px, {text_len} tokens, K={cfg.model.queue_size}: "
        f"{shape.note}",
        flush=True,
    )
    rows = []
    for build in (build_full, build_clip):
        row = measure_phase(build, cfg, batch, args, name)
        row.update(shape=name, batch=batch_size, text_len=text_len, overrides=overrides, config=tower_details(cfg))
        rows.append(row)
    return rows


def fill_from_tokenizer(cfg) -> None:
    """What ``build_module`` takes from the tokenizer: the from-scratch text tower's vocabulary, ViLEM's ids."""
    from omegaconf import open_dict

    with open_dict(cfg):
        tower = cfg.model.encoder.text_tower
        if not tower.pretrained and tower.vocab_size is None:
            tower.vocab_size = cfg.data.text_tokenizer.vocab_size
        if cfg.objective.get("vilem") is not None:
            vocab_size = _vocab_size(cfg)
            cfg.objective.vilem.mask_id, cfg.objective.vilem.special_ids = text_special_ids(vocab_size)
            cfg.objective.vilem.vocab_size = vocab_size


def _vocab_size(cfg) -> int:
    tower = cfg.model.encoder.text_tower
    if tower.pretrained:
        from transformers import BertConfig

        from cots.local_paths import resolve_local_dir

        return int(BertConfig.from_pretrained(str(resolve_local_dir(tower.pretrained))).vocab_size)
    return int(tower.vocab_size)


# Dense bf16 tensor-core peaks from the data sheets (FLOP/s), for a second MFU next to the measured one.
NOMINAL_BF16_PEAK = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def nominal_peak(device: str, precision: str) -> float | None:
    if device != "cuda" or precision != "bf16":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in NOMINAL_BF16_PEAK.items() if key in name), None)


def add_rates(rows: list[dict], matmul_flops_per_s: float, nominal: float | None = None) -> dict[str, float]:
    """pairs/s, achieved FLOP/s, its share of the matmul rate (and of the data-sheet peak); the overhead ratio per
    shape."""
    for row in rows:
        row["pairs_per_s"] = row["batch"] / row["median_s"]
        row["achieved_flops_per_s"] = row["flops"] / row["median_s"]
        row["of_matmul"] = row["achieved_flops_per_s"] / matmul_flops_per_s
        if nominal:
            row["of_nominal_peak"] = row["achieved_flops_per_s"] / nominal
    ratios = {}
    for shape in dict.fromkeys(r["shape"] for r in rows):
        full = next(r for r in rows if r["shape"] == shape and r["step"] == "full")
        clip = next(r for r in rows if r["shape"] == shape and r["step"] == "clip")
        full["flops_vs_clip"] = full["flops"] / clip["flops"]
        ratios[shape] = full["median_s"] / (full["flops_vs_clip"] * clip["median_s"])
        full["overhead_ratio"] = ratios[shape]
    return ratios


COLUMNS = [
    ("shape", "shape", ""),
    ("step", "step", ""),
    ("batch", "batch", "d"),
    ("ms/step (median)", "ms", ".1f"),
    ("pairs/s", "pairs_per_s", ".1f"),
    ("GFLOP/step", "gflop", ".1f"),
    ("FLOPs vs CLIP", "flops_vs_clip", ".2f"),
    ("achieved GFLOP/s", "gflops", ".1f"),
    ("of matmul", "pct_matmul", ""),
    ("peak mem MB", "peak_mem_mb", ".0f"),
    ("overhead ratio", "overhead_ratio", ".2f"),
]


def print_table(rows: list[dict], matmul: dict, ratios: dict[str, float], args) -> str:
    view = [
        {
            **r,
            "ms": r["median_s"] * 1e3,
            "gflop": r["flops"] / 1e9,
            "gflops": r["achieved_flops_per_s"] / 1e9,
            "pct_matmul": f"{100 * r['of_matmul']:.1f}%",
            "pct_nominal": f"{100 * r['of_nominal_peak']:.1f}%" if "of_nominal_peak" in r else None,
        }
        for r in rows
    ]
    columns = COLUMNS + (
        [("of bf16 data-sheet peak", "pct_nominal", "")] if any("of_nominal_peak" in r for r in rows) else []
    )
    method = rows[0]["mem_method"] if rows else ""
    rate = matmul["used_flops_per_s"]
    lines = [
        f"Step benchmark on {args.device} ({args.precision}); matmul rate {rate / 1e9:.1f} GFLOP/s "
        f"(torch.mm {matmul['start']['n']}^3, best of start/end); peak memory: {method}, above the phase start; "
        f"{args.warmup} warm-up + {args.steps} timed steps",
        "",
        markdown_table(view, columns),
        "",
    ]
    for shape, ratio in ratios.items():
        verdict = "meets" if ratio <= 1.1 else "misses"
        lines.append(
            f"{shape}: full_time / (full_flops/clip_flops x clip_time) = {ratio:.2f} ({verdict} the <= 1.1 target)"
        )
    text = "\n".join(lines)
    print("\n" + text)
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per step kind")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--shapes", default="emoji,large", help=f"comma-separated, of {sorted(SHAPES)}")
    parser.add_argument("--batch", type=int, default=None, help="override the shape's batch")
    parser.add_argument("--text-len", type=int, default=16, help="tokens of the longest caption (the padded length)")
    parser.add_argument(
        "--matmul-n", type=int, default=None, help="size of the reference torch.mm (2048 CPU, 8192 CUDA)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--dry-run", action="store_true", help=f"depth-1 towers, batch {DRY_RUN_BATCH}: a quick check")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every shape")
    args = parser.parse_intermixed_args(argv)  # flags and Hydra overrides in any order
    args.shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if args.dry_run:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    release_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # as cots-train does
    n = args.matmul_n or (512 if args.dry_run else 8192 if args.device == "cuda" else 2048)
    reps = 20 if args.device == "cuda" else 5
    matmul = {"start": matmul_rate(args.device, args.precision, n, reps)}
    rows = []
    for name in args.shapes:
        rows += run_shape(name, args)
    matmul["end"] = matmul_rate(args.device, args.precision, n, reps)
    matmul["used_flops_per_s"] = max(matmul["start"]["best_flops_per_s"], matmul["end"]["best_flops_per_s"])
    matmul["nominal_bf16_peak"] = nominal_peak(args.device, args.precision)
    ratios = add_rates(rows, matmul["used_flops_per_s"], matmul["nominal_bf16_peak"])
    table = print_table(rows, matmul, ratios, args)
    result = {
        "machine": machine_info(args.device),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "matmul": matmul,
        "overhead_ratio": ratios,
        "rows": rows,
        "table": table,
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
