"""Speed of ``cots-data index-shards`` on img2dataset-sized shards: shards/s and samples/s.

Writes ``--shards`` tars of ``--samples`` samples each (``<key>.jpg`` of ``--kb`` kB, ``<key>.txt``,
``<key>.json``, as img2dataset writes them), then times the index with 1 and 2 worker processes (the
files are in the page cache after writing: this is the header-parsing rate, not a cold disk's seek rate).

    python bench/index_speed.py                  # writes bench/results/index_speed.{md,json}
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cots.prepare.shard_indexer import index_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--samples", type=int, default=2000, help="samples per shard")
    parser.add_argument("--kb", type=int, default=30, help="JPEG size in kB")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "index_speed"))
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        folder.mkdir()
        blob = os.urandom(args.kb * 1000)
        for shard in range(args.shards):
            with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
                for i in range(args.samples):
                    key = f"{shard:05d}{i:04d}"
                    for ext, data in (("jpg", blob), ("txt", b"a caption"), ("json", b'{"key": 1}')):
                        info = tarfile.TarInfo(f"{key}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        size = sum(p.stat().st_size for p in folder.iterdir())
        for workers in (1, 2):
            (folder / "cots-index.json").unlink(missing_ok=True)
            start = time.perf_counter()
            summary = index_shards([str(folder)], workers=workers, log=lambda _: None)
            seconds = time.perf_counter() - start
            assert summary["samples"] == args.shards * args.samples
            rows.append(
                {
                    "workers": workers,
                    "seconds": seconds,
                    "shards_per_s": args.shards / seconds,
                    "samples_per_s": summary["samples"] / seconds,
                    "gb_per_s": size / seconds / 1e9,
                }
            )
            print(rows[-1], flush=True)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    lines = [
        "# `cots-data index-shards` speed (`python bench/index_speed.py`)",
        "",
        f"{args.shards} shards x {args.samples} samples (jpg {args.kb} kB + txt + json: {size / 1e9:.2f} GB), "
        f"{os.cpu_count()} cores shared with other jobs (load average {load} after), files in the page cache.",
        "",
        "| workers | seconds | shards/s | samples/s | GB/s of shards |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['workers']} | {r['seconds']:.1f} | {r['shards_per_s']:.1f} | {r['samples_per_s']:.0f} | "
        f"{r['gb_per_s']:.1f} |"
        for r in rows
    ]
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows, "bytes": size}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
