"""How eval_scale_before.json was measured: the ranking before the tiled pass (commit 649f54d, one chunked pass
per direction) on the 1M x 5M galleries of bench/retrieval_scale.py, in rounds that alternate with the floor.

    OMP_WAIT_POLICY=PASSIVE python bench/results/eval_scale_before.py aligned   # from the repository root

Extrapolated as that commit's bench did: the first chunk of each direction, plus the median of 3 later chunks
per round times the remaining chunks.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retrieval_scale import EMBED_DIM, floor_rate, make_gallery  # noqa: E402

COMMIT = "649f54d"


def previous_retrieval():
    source = subprocess.run(["git", "show", f"{COMMIT}:cots/metrics/retrieval.py"], capture_output=True, text=True)
    path = Path(tempfile.mkdtemp()) / "previous_retrieval.py"
    path.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location("previous_retrieval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(kind: str) -> dict:
    old = previous_retrieval()
    images, texts, text_to_image = make_gallery(1_000_000, kind, 3.0)
    rows_i2t, rows_t2i = old.rows_per_chunk(texts.shape[0], 4), old.rows_per_chunk(images.shape[0], 4)
    chunks_i2t, chunks_t2i = -(-images.shape[0] // rows_i2t), -(-texts.shape[0] // rows_t2i)
    i2t = old.iter_image_to_text_ranks(images, texts, text_to_image)
    t2i = old.iter_text_to_image_ranks(images, texts, text_to_image)

    def seconds(chunks) -> float:
        start = time.perf_counter()
        next(chunks)
        return time.perf_counter() - start

    first_i2t, first_t2i = seconds(i2t), seconds(t2i)
    rounds = []
    for _ in range(5):
        floor = floor_rate()["flops_per_s"]
        chunk_i2t = statistics.median(seconds(i2t) for _ in range(3))
        chunk_t2i = statistics.median(seconds(t2i) for _ in range(3))
        total = first_i2t + (chunks_i2t - 1) * chunk_i2t + first_t2i + (chunks_t2i - 1) * chunk_t2i
        rounds.append({"floor": floor, "i2t_chunk": chunk_i2t, "t2i_chunk": chunk_t2i, "seconds": total})
        print(f"floor {floor / 1e9:.0f} GFLOP/s, pass {total:.4g} s", flush=True)
    flop = 2 * images.shape[0] * texts.shape[0] * EMBED_DIM
    floor, total = statistics.median(r["floor"] for r in rounds), statistics.median(r["seconds"] for r in rounds)
    return {
        "implementation": f"{COMMIT}: chunked, one pass per direction",
        "gallery": kind,
        "rows_i2t": rows_i2t,
        "rows_t2i": rows_t2i,
        "seconds": total,
        "floor_flops_per_s": floor,
        "ratio": total * floor / flop,
        "ratio_paired_median": statistics.median(r["seconds"] * r["floor"] / flop for r in rounds),
        "rounds": rounds,
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
