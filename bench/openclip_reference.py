"""The open_clip reference of the emoji demo, measured on this machine.

The yardstick of ``experiment=emoji_demo``: the same towers (the demo's ViT from scratch and the pretrained
MiniLM), the same pairs (``trainval_names.json``), the same crops, trained the way open_clip trains CLIP:
its in-batch loss (``open_clip.loss.ClipLoss``, logit scale learned from 1/0.07 and capped at 100), its AdamW
conventions (betas 0.9/0.98, eps 1e-6, weight decay 0.2 on matrices only, none on gains, biases and the
logit scale), warm-up then cosine, bf16 autocast; batch 128 for 230 steps as in the reference run the issue
cites (262.3 rsum in 12.6 min on the machine it was measured on). Scored by the same evaluation as COTS
(``trainer.test`` of the COTS module holding these weights) on the held-out Google and Twitter galleries.

    python bench/openclip_reference.py --out logs/bench/openclip_reference       # seed 42, 230 steps
    python bench/openclip_reference.py --steps 3 --out /tmp/ocr                   # a quick check

Writes ``<out>/openclip_reference.{json,md}``: steps, batch, median step, wall minutes of training (data
loading included, model build and scoring not), rsum per gallery. Run it on a quiet machine: its minutes are
the budget the demo must stay within.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from open_clip.loss import ClipLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from runs import RETRIEVAL_KEYS, compose_run, score_galleries, write_results  # noqa: E402

from cots.train import build_module  # noqa: E402

GALLERIES = {"google": "test_google.json", "twitter": "test_twitter.json"}
MAX_LOGIT_SCALE = math.log(100)  # open_clip clamps logit_scale to ln(100) after every step


def open_clip_param_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """open_clip's rule: no weight decay on 1-d parameters (norm gains, biases) and the logit scale."""

    def exclude(name: str, param: torch.nn.Parameter) -> bool:
        return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    decay = [p for n, p in named if p.requires_grad and not exclude(n, p)]
    no_decay = [p for n, p in named if p.requires_grad and exclude(n, p)]
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def cosine_with_warmup(step: int, steps: int, warmup: int) -> float:
    """open_clip's ``cosine_lr``: linear warm-up, then cosine to 0 (a factor of the base rate)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=230)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--weight-decay", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=23, help="warm-up steps (10%% of 230)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--precision",
        choices=["bf16", "fp32"],
        default="bf16",
        help="bf16: autocast as the demo trains (open_clip's --precision amp_bf16); fp32: its --precision fp32",
    )
    parser.add_argument("--out", type=Path, default=Path("logs/bench/openclip_reference"))
    args = parser.parse_args()

    # The demo's data and towers; no pair groups (in-batch CLIP has none), no COTS objective.
    overrides = ["experiment=emoji_demo", f"data.batch_size={args.batch}", "data.pair_groups=null", f"seed={args.seed}"]
    cfg = compose_run(overrides, args.out)
    L.seed_everything(args.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    tokenizer = datamodule.build_text_tokenizer()
    module = build_module(cfg, tokenizer.vocab_size, tokenizer.to_str(), tokenizer.mask_id, tokenizer.special_ids)
    encoder = module.model.encoder.train()
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    named = [*encoder.named_parameters(), ("logit_scale", logit_scale)]
    optimizer = torch.optim.AdamW(
        open_clip_param_groups(named, args.weight_decay), lr=args.lr, betas=(0.9, 0.98), eps=1e-6, fused=True
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, args.steps, args.warmup))
    loss_fn = ClipLoss()

    step_seconds: list[float] = []
    step, epoch = 0, 0
    start = time.perf_counter()
    while step < args.steps:
        loader = datamodule.train_dataloader()
        datamodule.train_sampler.set_epoch(epoch)
        tick = time.perf_counter()
        for batch in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                image = encoder.encode_image(batch["images"]).embedding  # B x D, L2-normalised
                text = encoder.encode_text(batch["input_ids"], batch["attention_mask"]).embedding  # B x D
            loss = loss_fn(image.float(), text.float(), logit_scale.exp())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            step += 1
            now = time.perf_counter()
            step_seconds.append(now - tick)
            tick = now
            if step % 10 == 0 or step == args.steps:
                print(
                    f"step {step}/{args.steps} loss {loss.item():.3f} scale {logit_scale.exp().item():.1f} "
                    f"{step_seconds[-1]:.2f} s",
                    flush=True,
                )
            if step >= args.steps:
                break
        epoch += 1
    train_minutes = (time.perf_counter() - start) / 60

    encoder.eval()
    trainer = L.Trainer(
        accelerator="cpu",
        precision=cfg.trainer.precision if args.precision == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data_dir = Path(cfg.data.train_manifest).parent
    scores = score_galleries(trainer, module, datamodule, {k: str(data_dir / v) for k, v in GALLERIES.items()})
    rows = [
        {
            "run": f"open_clip reference, {args.precision}, seed {args.seed}",
            "gallery": name,
            **{key: table[key] for key in RETRIEVAL_KEYS},
            "steps": step,
            "batch": args.batch,
            "median_step_s": statistics.median(step_seconds),
            "train_minutes": train_minutes,
        }
        for name, table in scores.items()
    ]
    rows[0]["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "loadavg": os.getloadavg(),
    }
    header = (
        f"# open_clip reference (`python bench/openclip_reference.py --steps {args.steps} --batch {args.batch} "
        f"--seed {args.seed} --precision {args.precision}`)\n\n"
        "Same towers, pairs and crops as `experiment=emoji_demo`; open_clip's ClipLoss and AdamW conventions, "
        f"lr {args.lr}, weight decay {args.weight_decay}, warm-up {args.warmup}, {args.precision}. "
        f"Load average at the end: {os.getloadavg()[0]:.2f} (2 cores)."
    )
    columns = ["run", "gallery", *RETRIEVAL_KEYS, "steps", "batch", "median_step_s", "train_minutes"]
    print(write_results(rows, args.out, "openclip_reference", columns, header))


if __name__ == "__main__":
    main()
