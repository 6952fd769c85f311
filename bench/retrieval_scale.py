"""Retrieval at scale: the 1M x 5M pass against the matrix-product floor, the split across ranks, the tile.

    python bench/retrieval_scale.py --part scale --out bench/results/eval_scale.json    # 1M x 5M, ~10 min
    python bench/retrieval_scale.py --part ranks                                          # 2 ranks vs 1 process
    python bench/retrieval_scale.py --part tiles --tiles 512x2048,1024x2048,1024x4096      # tile shapes

Galleries: N images x 5N captions, D=256, fp32 unit vectors; ``random`` (captions unrelated to their
image: every query stops counting at 10 better candidates within its first tile) or ``aligned`` (caption =
its image + ``--spread`` x a random unit vector, normalised: the ground truth ranks near the top and every
query counts to the end, the costly case).

Floor: the time 2 N M D FLOP take at the rate of a plain large fp32 ``torch.mm`` on the same threads, the
faster of a square 4096^3 product and an (8192 x 256) @ (256 x 16384) one. Scale: the set-up (pairs sorted,
thresholds by tile-shaped products, all of them) is timed once; then rounds alternate a floor measurement
and the pass over ``--blocks`` blocks of 1024 images against all 5M captions (other blocks each round, at
least two per worker), so that load from other jobs drifts into both. Each block is timed; a worker's first
block also starts its caption-side counting (on random data every caption counts fully there and stops), so
the pass is extrapolated as set-up + first block + (blocks per worker - 1) x the median other block.
Ranks: one process (its workers) against 2 gloo processes of 1 thread each on the same gallery, the tables
compared with ==. Run with OMP_WAIT_POLICY=PASSIVE on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from measure import PeakMemory, machine_info, markdown_table, release_freed_memory, write_json

EMBED_DIM = 256
CAPTIONS_PER_IMAGE = 5
LIMIT = 10  # retrieval_metrics' limit (R@1/5/10)


def make_gallery(num_images: int, kind: str, spread: float, seed: int = 0):
    """Unit image (N, D) and caption (5N, D) embeddings and the (5N,) shuffled image of each caption."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(num_images, EMBED_DIM, generator=gen)
    texts = torch.randn(CAPTIONS_PER_IMAGE * num_images, EMBED_DIM, generator=gen)
    text_to_image = torch.arange(num_images).repeat_interleave(CAPTIONS_PER_IMAGE)
    text_to_image = text_to_image[torch.randperm(text_to_image.shape[0], generator=gen)]
    step = 1 << 16
    for start in range(0, num_images, step):  # in place, in slices: no second copy of the gallery
        block = images[start : start + step]
        block.div_(block.norm(dim=1, keepdim=True))
    for start in range(0, texts.shape[0], step):
        block = texts[start : start + step]
        block.div_(block.norm(dim=1, keepdim=True))
        if kind == "aligned":
            block.mul_(spread).add_(images[text_to_image[start : start + step]])
            block.div_(block.norm(dim=1, keepdim=True))
    return images, texts, text_to_image


def floor_rate() -> dict:
    """FLOP/s of plain large fp32 products on the current threads: square and of the ranking's inner size."""
    rates = {}
    for name, (m, k, n) in {"square_4096": (4096, 4096, 4096), "d256": (8192, EMBED_DIM, 16384)}.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)
        start = time.perf_counter()
        for _ in range(2):
            torch.mm(a, b, out=out)
        rates[name] = 2 * 2 * m * k * n / (time.perf_counter() - start)
    return {"flops_per_s": max(rates.values()), **rates}


# -- scale: the pass over a slice of blocks, extrapolated, against the floor ---------------------------
def timed_pass_class():
    from cots.metrics.ranking import TwoWayPass

    class TimedPass(TwoWayPass):
        """Records each block's seconds, and which blocks were a worker's first (its caption-side counting
        starts there, which costs most on random data)."""

        def _count(self, share, column_counts):
            self.firsts = getattr(self, "firsts", set()) | {share.start}
            super()._count(share, column_counts)

        def _count_block(self, i, *rest):
            start = time.perf_counter()
            super()._count_block(i, *rest)
            self.seconds = [*getattr(self, "seconds", []), (i, time.perf_counter() - start)]

    return TimedPass


def time_blocks(images, texts, text_to_image, grid, thresholds, blocks: range, workers: int) -> dict:
    """The pass over ``blocks`` (thresholds given): wall seconds, the median seconds of a worker's first block
    and of the other blocks, and whether every ground truth read from its tile equals its threshold."""
    from cots.metrics.ranking import same_scores

    counts = timed_pass_class()(images, texts, text_to_image, grid, blocks, LIMIT, workers)
    counts.set_thresholds(thresholds)
    start = time.perf_counter()
    counts.run()
    wall = time.perf_counter() - start
    first = [t for i, t in counts.seconds if i in counts.firsts]
    rest = [t for i, t in counts.seconds if i not in counts.firsts]
    reproduced = same_scores(counts.observed, thresholds[counts.pair_lo : counts.pair_hi])
    cold, steady = statistics.median(first), statistics.median(rest or first)
    return {"seconds": wall, "first_block_seconds": cold, "block_seconds": steady, "thresholds_reproduced": reproduced}


def extrapolate(setup: float, timed: dict, num_blocks: int, workers: int) -> float:
    """Seconds of the whole pass: set-up, then each worker's first block and its other blocks."""
    return setup + timed["first_block_seconds"] + (num_blocks / workers - 1) * timed["block_seconds"]


def scale(args) -> dict:
    from cots.metrics import ranking
    from cots.metrics.ranking import Tiling, TwoWayPass

    images, texts, text_to_image = make_gallery(args.images, args.gallery, args.spread)
    n, m = images.shape[0], texts.shape[0]
    workers = ranking.worker_count(texts.device)
    grid = Tiling.of(n, m, ranking.TILE_ROWS)
    with PeakMemory("cpu") as memory:  # the floor's products are measured outside: they are not the pass's
        start = time.perf_counter()
        whole = TwoWayPass(images, texts, text_to_image, grid, None, LIMIT, workers)
        thresholds = whole.ground_truth()
        whole.set_thresholds(thresholds)
        setup = time.perf_counter() - start
    peaks = [memory.peak_mb]
    rounds = []
    for r in range(args.rounds):
        floor = floor_rate()
        blocks = range(r * args.blocks, (r + 1) * args.blocks)
        with PeakMemory("cpu") as memory:
            timed = time_blocks(images, texts, text_to_image, grid, thresholds, blocks, workers)
        peaks.append(memory.peak_mb)
        rounds.append({"floor": floor, "blocks": [blocks.start, blocks.stop], **timed})
        rounds[-1]["pass_seconds"] = extrapolate(setup, timed, grid.num_blocks, workers)
        print(
            f"  round {r}: floor {floor['flops_per_s'] / 1e9:.0f} GFLOP/s; {args.blocks} blocks in "
            f"{timed['seconds']:.1f} s, a worker's first {timed['first_block_seconds']:.2f} s, "
            f"the others {timed['block_seconds']:.2f} s each",
            flush=True,
        )
    flop = 2 * n * m * EMBED_DIM
    floor = statistics.median(x["floor"]["flops_per_s"] for x in rounds)
    cold = statistics.median(x["first_block_seconds"] for x in rounds)
    steady = statistics.median(x["block_seconds"] for x in rounds)
    total = extrapolate(setup, {"first_block_seconds": cold, "block_seconds": steady}, grid.num_blocks, workers)
    paired = [x["pass_seconds"] * x["floor"]["flops_per_s"] / flop for x in rounds]
    return {
        "gallery": f"{n:,} x {m:,} {args.gallery}"
        + (f" (spread {args.spread:g})" if args.gallery == "aligned" else ""),
        "images": n,
        "captions": m,
        "flop": flop,
        "tile": f"{grid.rows} x {grid.columns}",
        "workers": workers,
        "blocks": grid.num_blocks,
        "setup_seconds": setup,
        "first_block_seconds": cold,
        "block_seconds": steady,
        "seconds": total,
        "floor_flops_per_s": floor,
        "floor_seconds": flop / floor,
        "ratio": total * floor / flop,
        "ratio_paired_median": statistics.median(paired),
        "measured_on": f"{args.blocks} blocks x {args.rounds} rounds of {grid.num_blocks:,}",
        "thresholds_reproduced": all(x["thresholds_reproduced"] for x in rounds),
        "rounds": rounds,
        "peak_mem_mb": max(peaks),  # RSS high-water mark above the gallery: the set-up, or one round's pass
        "mem_method": memory.method,
    }


# -- ranks: one process against two gloo processes -----------------------------------------------------
def _rank_main(rank: int, args, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from cots.metrics.retrieval import retrieval_metrics

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    images, texts, text_to_image = make_gallery(args.rank_images, args.gallery, args.spread)
    dist.barrier()
    start = time.perf_counter()
    table = retrieval_metrics(images, texts, text_to_image, across_ranks=True)
    dist.barrier()
    seconds = time.perf_counter() - start
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"seconds": seconds, "table": table}))
    dist.destroy_process_group()


def ranks(args) -> list[dict]:
    import torch.multiprocessing as mp

    from cots.metrics.retrieval import retrieval_metrics

    images, texts, text_to_image = make_gallery(args.rank_images, args.gallery, args.spread)
    one, two, tables = [], [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        single = retrieval_metrics(images, texts, text_to_image)
        one.append(time.perf_counter() - start)
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_rank_main, args=(args, f"{tmp}/init", tmp), nprocs=2, join=True)
            parts = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in (0, 1)]
        two.append(max(p["seconds"] for p in parts))
        tables.append(all(p["table"] == single for p in parts))
        print(f"  1 process {one[-1]:.2f} s, 2 ranks {two[-1]:.2f} s, tables equal: {tables[-1]}", flush=True)
    gallery = f"{images.shape[0]:,} x {texts.shape[0]:,} {args.gallery}"
    common = {"gallery": gallery, "rsum": single["rsum"], "rounds": args.rounds}
    return [
        {
            **common,
            "setup": f"1 process, {torch.get_num_threads()} threads (workers)",
            "seconds": statistics.median(one),
        },
        {
            **common,
            "setup": "2 ranks (gloo), 1 thread each",
            "seconds": statistics.median(two),
            "table_equal_to_1_process": all(tables),
        },
    ]


# -- tiles: the tile shape -------------------------------------------------------------------------------
def tiles(args) -> list[dict]:
    from cots.metrics import ranking
    from cots.metrics.ranking import Tiling, TwoWayPass

    images, texts, text_to_image = make_gallery(args.tile_images, args.gallery, args.spread)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.tiles.split(",")]
    workers = ranking.worker_count(texts.device)
    thresholds = None
    rates = {s: [] for s in shapes}
    floors = []
    for _ in range(args.rounds):
        floors.append(floor_rate()["flops_per_s"])
        for rows, columns in shapes:
            grid = Tiling.of(images.shape[0], texts.shape[0], rows, columns)
            counts = TwoWayPass(images, texts, text_to_image, grid, range(args.tile_queries // rows), LIMIT, workers)
            if thresholds is None:
                thresholds = (images[text_to_image[counts.pair_text]] * texts[counts.pair_text]).sum(1)
            counts.set_thresholds(thresholds)
            start = time.perf_counter()
            counts.run()
            rates[(rows, columns)].append(
                2 * args.tile_queries * texts.shape[0] * EMBED_DIM / (time.perf_counter() - start)
            )
    floor = statistics.median(floors)
    return [
        {
            "tile": f"{r} x {c}",
            "equivalent_flops_per_s": statistics.median(rates[(r, c)]),
            "floor_flops_per_s": floor,
            "ratio": floor / statistics.median(rates[(r, c)]),
        }
        for r, c in shapes
    ]


SCALE_COLUMNS = [
    ("gallery", "gallery", ""),
    ("tile, workers", "tile_workers", ""),
    ("measured on", "measured_on", ""),
    ("set-up s", "setup_seconds", ".3g"),
    ("pass s (extrapolated)", "seconds", ".4g"),
    ("floor GFLOP/s", "floor_gflops", ".0f"),
    ("floor s", "floor_seconds", ".4g"),
    ("pass / floor", "ratio", ".2f"),
    ("paired rounds: median ratio", "ratio_paired_median", ".2f"),
    ("peak MB (above embeddings)", "peak_mem_mb", ".0f"),
]
RANK_COLUMNS = [
    ("gallery", "gallery", ""),
    ("setup", "setup", ""),
    ("time s (median)", "seconds", ".3g"),
    ("rsum", "rsum", ".4f"),
    ("table == 1 process", "table_equal_to_1_process", ""),
]
TILE_COLUMNS = [
    ("tile", "tile", ""),
    ("GFLOP/s equivalent", "gflops", ".0f"),
    ("floor GFLOP/s", "floor_gflops", ".0f"),
    ("pass / floor", "ratio", ".2f"),
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["scale", "ranks", "tiles", "all"], default="all")
    parser.add_argument("--gallery", choices=["random", "aligned", "both"], default="both")
    parser.add_argument("--spread", type=float, default=3.0, help="aligned: noise norm relative to the image")
    parser.add_argument("--images", type=int, default=1_000_000, help="scale: images (x5 captions)")
    parser.add_argument("--blocks", type=int, default=4, help="scale: blocks of images timed per round (2 per worker)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rank-images", type=int, default=30_000, help="ranks: images (x5 captions)")
    parser.add_argument("--tile-images", type=int, default=200_000, help="tiles: images (x5 captions)")
    parser.add_argument("--tile-queries", type=int, default=8192, help="tiles: images timed per round")
    parser.add_argument("--tiles", default="256x2048,512x2048,1024x2048,1024x4096,512x8192")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here (and the tables as .md)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_scale_worker(args, gallery: str) -> dict:
    """The scale measurement in a fresh process (its own peak RSS; the 1M x 5M gallery freed after)."""
    cmd = [sys.executable, __file__, "--worker", "--part", "scale", "--gallery", gallery, "--spread", str(args.spread)]
    cmd += ["--images", str(args.images), "--blocks", str(args.blocks), "--rounds", str(args.rounds)]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"gallery": gallery, "error": f"exit {done.returncode}"}
    print(done.stdout.rsplit("\n", 2)[0], flush=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    release_freed_memory()
    if args.worker:
        result = scale(args)
        print(json.dumps(result))
        return result
    galleries = ["random", "aligned"] if args.gallery == "both" else [args.gallery]
    result = {"machine": machine_info("cpu"), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "args": {}}
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    text = []
    if args.part in ("scale", "all"):
        rows = []
        for gallery in galleries:
            print(f"Scale: {gallery}", flush=True)
            row = run_scale_worker(args, gallery)
            if "error" not in row:
                row["tile_workers"] = f"{row['tile']}, {row['workers']}"
                row["floor_gflops"] = row["floor_flops_per_s"] / 1e9
            rows.append(row)
        result["scale"] = rows
        text += [
            "Scale: the pass both ways (limit 10) against the matrix-product floor",
            "",
            markdown_table(rows, SCALE_COLUMNS),
            "",
        ]
    aligned = args.gallery if args.gallery != "both" else "aligned"
    if args.part in ("ranks", "all"):
        print("Ranks", flush=True)
        args.gallery = aligned
        rows = ranks(args)
        result["ranks"] = rows
        text += ["Split across ranks (2-core CPU)", "", markdown_table(rows, RANK_COLUMNS), ""]
    if args.part in ("tiles", "all"):
        print("Tiles", flush=True)
        args.gallery = aligned
        rows = tiles(args)
        for row in rows:
            row["gflops"], row["floor_gflops"] = row["equivalent_flops_per_s"] / 1e9, row["floor_flops_per_s"] / 1e9
        result["tiles"] = rows
        text += [
            f"Tile shapes ({args.tile_queries} images x {5 * args.tile_images:,} captions)",
            "",
            markdown_table(rows, TILE_COLUMNS),
            "",
        ]
    result["table"] = "\n".join(text)
    print("\n" + result["table"])
    write_json(args.out, result)
    if args.out is not None:
        args.out.with_suffix(".md").write_text(result["table"])
    return result


if __name__ == "__main__":
    main()
