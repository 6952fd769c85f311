"""Retrieval benchmarks: tiled ranking as the gallery grows, and two-stream against single-stream retrieval.

    python bench/retrieval_speed.py                                   # both tables, full sizes (long at 100k and 1M)
    python bench/retrieval_speed.py --quick                           # 1k and 10k galleries, small samples
    python bench/retrieval_speed.py --part scoring --sizes 1000,10000,100000,1000000 --out logs/bench/eval.json
    python bench/retrieval_speed.py --part streams --pairs 100,1000,5000

Scoring: N images x 5N captions of random unit embeddings (D=256, fp32). ``cots.metrics.retrieval``
ranks both ways in one pass over tiles whose height follows from ``--memory-budget-mb``; the naive reference builds
the whole N x 5N score matrix and argsorts it (each row for image->text, each column for
text->image), and is skipped where the bytes it needs exceed the memory available. Every
measurement runs in its own subprocess; its peak memory is the rise of the process's RSS
high-water mark (Linux VmHWM, reset after the embeddings are made) above its RSS at that point,
so it counts the scoring's temporaries, not the embeddings (MB = 2^20 bytes). Where a full pass would take
longer than ``--max-seconds`` it computes the thresholds of all pairs, runs the first blocks of images and
extrapolates (set-up plus the blocks' time x blocks / measured); the table says on how many blocks.
``bench/retrieval_scale.py`` times the 1M x 5M pass against the matrix-product floor and the split across ranks.

Streams: the paper's claim that two-stream retrieval is about 10,800x faster than single-stream.
Same-size towers from ``experiment=emoji_demo`` (the ViT and a from-scratch MiniLM-shaped BERT,
random weights); two-stream = encode N images and 5N captions once + the tiled ranking;
single-stream = a cross-encoder (``bench/cross_encoder.py``: depth = image depth + text depth,
width = the wider tower) run on every one of the 5N^2 pairs. Per-item encode times and the
per-pair time come from batched samples and are extrapolated linearly; the ranking is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from measure import (
    PeakMemory,
    compose_config,
    count_flops,
    machine_info,
    markdown_table,
    memory_available_bytes,
    release_freed_memory,
    write_json,
)

EMBED_DIM = 256
CAPTIONS_PER_IMAGE = 5
# Bytes per score entry of the naive reference: fp32 scores, int64 argsort (plus sort's fp32 values), int64 positions.
NAIVE_BYTES_PER_SCORE = 4 + 8 + 4 + 8
PAPER_SPEEDUP = 10_800


# -- scoring: one measurement per subprocess ---------------------------------------------------------
def random_gallery(num_images: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unit image (N, D) and caption (5N, D) embeddings, and the (5N,) image index of each caption (shuffled)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, EMBED_DIM, generator=gen)
    texts = torch.randn(CAPTIONS_PER_IMAGE * num_images, EMBED_DIM, generator=gen)
    for x in (images, texts):
        for start in range(0, x.shape[0], 1 << 16):  # in place, in slices: no second copy of the gallery
            block = x[start : start + (1 << 16)]
            block.div_(block.norm(dim=1, keepdim=True))
    text_to_image = torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    text_to_image = text_to_image[torch.randperm(text_to_image.shape[0], generator=gen)]
    return images, texts, text_to_image


def score_tiled(num_images: int, budget_mb: float, max_seconds: float) -> dict:
    """The tiled pass both ways (``limit`` 10, as ``retrieval_metrics``). When the estimate from the first
    blocks (two per worker) exceeds ``max_seconds``, extrapolated from them as ``bench/retrieval_scale.py``
    does: set-up (all thresholds) + a worker's first block + its other blocks x the median measured one."""
    from retrieval_scale import extrapolate, time_blocks

    from cots.metrics import ranking
    from cots.metrics.retrieval import RECALL_KS, ranks_both_ways, recall_table, tiling

    images, texts, text_to_image = random_gallery(num_images)
    workers = ranking.worker_count(texts.device)
    grid = tiling(images.shape[0], texts, None, budget_mb, workers)
    limit = max(RECALL_KS)
    out = {"rows": grid.rows, "columns": grid.columns, "workers": workers, "blocks": grid.num_blocks}
    with PeakMemory("cpu") as memory:
        start = time.perf_counter()
        counts = ranking.TwoWayPass(images, texts, text_to_image, grid, None, limit, workers)
        thresholds = counts.ground_truth()
        counts.set_thresholds(thresholds)
        setup = time.perf_counter() - start
        probe = range(min(2 * workers, grid.num_blocks))
        timed = time_blocks(images, texts, text_to_image, grid, thresholds, probe, workers)
        estimate = extrapolate(setup, timed, grid.num_blocks, workers)
        if estimate <= max_seconds or len(probe) == grid.num_blocks:
            start = time.perf_counter()
            i2t, t2i = ranks_both_ways(images, texts, text_to_image, None, budget_mb, limit)
            out.update(seconds=time.perf_counter() - start, blocks_measured=grid.num_blocks)
            out["rsum"] = recall_table(i2t, t2i)["rsum"]
        else:
            out.update(seconds=estimate, blocks_measured=len(probe), setup_seconds=setup)
            out.update(first_block_seconds=timed["first_block_seconds"], block_seconds=timed["block_seconds"])
    out["extrapolated"] = out["blocks_measured"] < grid.num_blocks
    return {**out, **memory.as_dict()}


def score_naive(num_images: int) -> dict:
    from cots.metrics.retrieval import QueryRanks, recall_table

    images, texts, text_to_image = random_gallery(num_images)
    num_texts = texts.shape[0]
    with PeakMemory("cpu") as memory:
        start = time.perf_counter()
        scores = images @ texts.t()  # N x M
        columns = torch.arange(num_texts)
        order = scores.argsort(dim=1, descending=True)  # N x M: captions by score, per image
        position = torch.empty_like(order).scatter_(1, order, columns.expand(num_images, -1))  # rank of each caption
        del order
        gt_position = position[text_to_image, columns]  # M: rank of each caption under its own image
        del position
        i2t = torch.full((num_images,), num_texts, dtype=torch.long).scatter_reduce_(
            0, text_to_image, gt_position, "amin"
        )
        order = scores.argsort(dim=0, descending=True)  # N x M: images by score, per caption
        position = torch.empty_like(order).scatter_(0, order, torch.arange(num_images)[:, None].expand(-1, num_texts))
        del order
        t2i = position[text_to_image, columns]
        del position, scores
        seconds = time.perf_counter() - start
    zeros, ones = torch.zeros_like(i2t), torch.ones_like(i2t)  # argsort breaks ties: none in random data
    i2t, t2i = QueryRanks(i2t, zeros, ones), QueryRanks(t2i, torch.zeros_like(t2i), torch.ones_like(t2i))
    return {"seconds": seconds, "rsum": recall_table(i2t, t2i)["rsum"], **memory.as_dict()}


def run_worker(kind: str, num_images: int, args) -> dict:
    """One measurement in a fresh process (clean allocator, its own peak RSS)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--sizes",
        str(num_images),
        "--memory-budget-mb",
        str(args.memory_budget_mb),
        "--max-seconds",
        str(args.max_seconds),
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def scoring_table(args) -> list[dict]:
    rows = []
    for n in args.sizes:
        m = CAPTIONS_PER_IMAGE * n
        embed_bytes = (n + m) * EMBED_DIM * 4
        available = memory_available_bytes()
        label = f"{n:,} x {m:,}"
        chunked = {
            "gallery": label,
            "images": n,
            "captions": m,
            "method": "tiled, both ways at once",
            "embeddings_mb": embed_bytes / 2**20,
        }
        need = embed_bytes + args.memory_budget_mb * 2**20
        if need > 0.9 * available:
            chunked["status"] = f"skipped (needs {need / 1e9:.1f} GB, {available / 1e9:.1f} GB available)"
        else:
            chunked.update(run_worker("chunked", n, args))
            chunked["status"] = chunked.get("error") or ("extrapolated" if chunked["extrapolated"] else "measured")
            if "blocks" in chunked:
                chunked["measured_on"] = f"{chunked['blocks_measured']:,} of {chunked['blocks']:,}"
                chunked["tile"] = f"{chunked['rows']:,} x {chunked['columns']:,}, {chunked['workers']} workers"
        print(f"  {label} chunked: {chunked.get('status')}", flush=True)
        rows.append(chunked)
        naive = {
            "gallery": label,
            "images": n,
            "captions": m,
            "method": "naive (full matrix + argsort)",
            "embeddings_mb": embed_bytes / 2**20,
        }
        need = n * m * NAIVE_BYTES_PER_SCORE + embed_bytes
        naive["needs_gb"] = need / 1e9
        if need > 0.9 * available:
            naive["status"] = f"skipped (needs {need / 1e9:.1f} GB, {available / 1e9:.1f} GB available)"
        elif need > args.naive_max_gb * 1e9:
            naive["status"] = f"skipped (needs {need / 1e9:.1f} GB > --naive-max-gb {args.naive_max_gb:g})"
        else:
            naive.update(run_worker("naive", n, args))
            naive["status"] = naive.get("error") or "measured"
            naive["measured_on"] = "all"
        print(f"  {label} naive: {naive['status']}", flush=True)
        rows.append(naive)
    return rows


SCORING_COLUMNS = [
    ("gallery (images x captions)", "gallery", ""),
    ("method", "method", ""),
    ("tile (images x captions)", "tile", ""),
    ("time s", "seconds", ".3g"),
    ("measured on k of n blocks", "measured_on", ""),
    ("status", "status", ""),
    ("peak MB (above embeddings)", "peak_mem_mb", ".0f"),
    ("embeddings MB", "embeddings_mb", ".0f"),
    ("rsum", "rsum", ".2f"),
]


# -- two-stream against single-stream -------------------------------------------------------------------
STREAM_OVERRIDES = [
    "experiment=emoji_demo",
    # MiniLM-L6's shape, from scratch (random weights): nothing is loaded.
    "model.encoder.text_tower.pretrained=null",
    "model.encoder.text_tower.vocab_size=30522",
    "model.encoder.text_tower.hidden_size=384",
    "model.encoder.text_tower.num_layers=6",
    "model.encoder.text_tower.num_heads=12",
    "model.encoder.text_tower.intermediate_size=1536",
]


def seconds_per_item(fn, batches: list, items: int) -> float:
    fn(batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        fn(batch)
    return (time.perf_counter() - start) / items


def streams_table(args) -> tuple[list[dict], dict]:
    from cross_encoder import cross_encoder_like
    from hydra.utils import instantiate

    from cots.metrics.retrieval import retrieval_metrics

    cfg = compose_config(STREAM_OVERRIDES + args.overrides)
    torch.manual_seed(0)
    encoder = instantiate(cfg.model.encoder).eval()
    cross = cross_encoder_like(encoder, args.text_len).eval()
    image_size, text_len, vocab = int(cfg.data.image_size), args.text_len, encoder.text_tower.vocab_size
    bs = args.encode_batch

    def images(n):
        return torch.randn(n, 3, image_size, image_size)

    def captions(n):
        return torch.randint(1000, vocab, (n, text_len)), torch.ones(n, text_len, dtype=torch.long)

    n_img, n_txt, n_pair = args.samples
    with torch.inference_mode():
        img_batches = [images(bs) for _ in range(max(1, n_img // bs))]
        txt_batches = [captions(bs) for _ in range(max(1, n_txt // bs))]
        pair_batches = [(images(bs), captions(bs)[0]) for _ in range(max(1, n_pair // bs))]
        t_img = seconds_per_item(lambda x: encoder.encode_image(x), img_batches, len(img_batches) * bs)
        t_txt = seconds_per_item(lambda x: encoder.encode_text(*x), txt_batches, len(txt_batches) * bs)
        t_pair = seconds_per_item(lambda x: cross(*x), pair_batches, len(pair_batches) * bs)
        f_img = count_flops(lambda: encoder.encode_image(img_batches[0]))[0] / bs
        f_txt = count_flops(lambda: encoder.encode_text(*txt_batches[0]))[0] / bs
        f_pair = count_flops(lambda: cross(*pair_batches[0]))[0] / bs
    per_item = {
        "image_encode_s": t_img,
        "caption_encode_s": t_txt,
        "pair_cross_s": t_pair,
        "image_encode_flops": f_img,
        "caption_encode_flops": f_txt,
        "pair_cross_flops": f_pair,
        "samples": {
            "images": len(img_batches) * bs,
            "captions": len(txt_batches) * bs,
            "pairs": len(pair_batches) * bs,
        },
        "towers": {"image": dict(cfg.model.encoder.image_tower), "text": dict(cfg.model.encoder.text_tower)},
        "cross_encoder": cross.describe,
    }
    rows = []
    for n in args.pairs:
        m = CAPTIONS_PER_IMAGE * n
        gallery = [torch.nn.functional.normalize(torch.randn(k, EMBED_DIM), dim=-1) for k in (n, m)]
        text_to_image = torch.arange(n).repeat_interleave(CAPTIONS_PER_IMAGE)
        start = time.perf_counter()
        retrieval_metrics(gallery[0], gallery[1], text_to_image, memory_budget_mb=args.memory_budget_mb)
        rank_s = time.perf_counter() - start
        two = n * t_img + m * t_txt + rank_s
        single = n * m * t_pair
        two_flops = n * f_img + m * f_txt + 2 * 2 * n * m * EMBED_DIM  # scores both ways
        rows.append(
            {
                "N": n,
                "captions": m,
                "pairs": n * m,
                "encode_s": n * t_img + m * t_txt,
                "rank_s": rank_s,
                "two_stream_s": two,
                "single_stream_s": single,
                "speedup": single / two,
                "flop_speedup": n * m * f_pair / two_flops,
                "paper": PAPER_SPEEDUP,
            }
        )
        print(f"  N={n}: two-stream {two:.3g} s, single-stream {single:.3g} s, {single / two:,.0f}x", flush=True)
    return rows, per_item


STREAM_COLUMNS = [
    ("N images", "N", ","),
    ("captions", "captions", ","),
    ("pairs", "pairs", ",.0f"),
    ("two-stream encode s", "encode_s", ".3g"),
    ("ranking s (measured)", "rank_s", ".3g"),
    ("two-stream total s", "two_stream_s", ".3g"),
    ("single-stream s (extrapolated)", "single_stream_s", ".3g"),
    ("speedup", "speedup", ",.0f"),
    ("FLOP ratio", "flop_speedup", ",.0f"),
]


# -- entry point ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["scoring", "streams", "both"], default="both")
    parser.add_argument(
        "--sizes", default=None, help="images per gallery (x5 captions); default 1000,10000,100000,1000000"
    )
    parser.add_argument("--pairs", default=None, help="N for two- vs single-stream; default 100,1000,5000")
    parser.add_argument("--quick", action="store_true", help="1k and 10k galleries, N=100,1000, small samples")
    parser.add_argument("--memory-budget-mb", type=float, default=512.0, help="tile temporaries (chunk_size=None)")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="longer passes are extrapolated")
    parser.add_argument("--naive-max-gb", type=float, default=float("inf"), help="skip the naive reference above this")
    parser.add_argument("--samples", default=None, help="images,captions,pairs timed for the stream table")
    parser.add_argument("--encode-batch", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    parser.add_argument("--worker", choices=["chunked", "naive"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the stream towers")
    args = parser.parse_args(argv)
    args.sizes = [
        int(s) for s in (args.sizes or ("1000,10000" if args.quick else "1000,10000,100000,1000000")).split(",")
    ]
    args.pairs = [int(s) for s in (args.pairs or ("100,1000" if args.quick else "100,1000,5000")).split(",")]
    samples = args.samples or ("64,128,64" if args.quick else "512,1024,512")
    args.samples = [int(s) for s in samples.split(",")]
    if args.quick:
        args.max_seconds = min(args.max_seconds, 10.0)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    release_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        result = (
            score_tiled(args.sizes[0], args.memory_budget_mb, args.max_seconds)
            if args.worker == "chunked"
            else score_naive(args.sizes[0])
        )
        print(json.dumps(result))
        return result
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = {
        "machine": machine_info("cpu"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    text = []
    if args.part in ("scoring", "both"):
        print("Retrieval scoring as the gallery grows", flush=True)
        rows = scoring_table(args)
        result["scoring"] = rows
        text += [
            f"Retrieval scoring, D={EMBED_DIM} fp32, budget {args.memory_budget_mb:g} MB of tiles; peak memory: "
            f"subprocess RSS high-water mark above the RSS after making the embeddings "
            f"({rows[0].get('mem_method', 'rss_hwm')}); time extrapolated beyond {args.max_seconds:g} s",
            "",
            markdown_table(rows, SCORING_COLUMNS),
            "",
        ]
    if args.part in ("streams", "both"):
        print("Two-stream against single-stream retrieval", flush=True)
        rows, per_item = streams_table(args)
        result["streams"] = {"rows": rows, "per_item": per_item}
        s = per_item["samples"]
        text += [
            f"Two-stream vs single-stream (paper: ~{PAPER_SPEEDUP:,}x); per item: image "
            f"{per_item['image_encode_s'] * 1e3:.3g} ms, caption {per_item['caption_encode_s'] * 1e3:.3g} ms, "
            f"pair (cross-encoder) {per_item['pair_cross_s'] * 1e3:.3g} ms, measured on {s['images']} images, "
            f"{s['captions']} captions, {s['pairs']} pairs; cross-encoder {per_item['cross_encoder']}",
            "",
            markdown_table(rows, STREAM_COLUMNS),
            "",
        ]
    result["table"] = "\n".join(text)
    print("\n" + result["table"])
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
