"""Search benchmark (issue #17 item 5): exact chunked search against FAISS flat, HNSW and IVF, 10k to 1M rows.

    python bench/search.py                                         # 10k, 100k, 1M -> bench/results/search.{md,json}
    python bench/search.py --quick --out logs/bench/search_quick.md   # two tiny sizes, a few seconds
    python bench/search.py --sizes 10000,100000 --queries 500 --dim 256
    python bench/search.py --search-params hnsw:efSearch=256,ivf:nprobe=32   # + rows with other search parameters

Data: synthetic L2-normalised rows of ``--dim`` (the model's ``embed_dim``, 256), not uniform noise but a mixture
of ``--clusters`` Gaussians on the sphere: random unit centres, cluster sizes following Zipf's law (exponent
``--zipf``), each cluster's spread drawn log-uniformly from ``--spread`` (row = centre + spread * N(0, I / D),
normalised). The queries are a held-out sample of the same mixture. Approximate recall depends on the
distribution: tighter, better separated clusters are easier for IVF and HNSW than this.

The real code path: the rows are written as ``cots-index`` writes them (``GenerationWriter``: float16 rows in a
memory-mapped ``embeddings-<gen>.npy``, paths, fingerprints, ``index.json`` last) and opened with
``SearchIndex.open``. ``exact`` is ``ExactBackend`` over that memory map; ``faiss flat`` is what
``Searcher(backend="faiss")`` builds in memory when the index stores none; ``faiss hnsw`` / ``faiss ivf`` are
built as ``cots-index --faiss`` builds them (``faiss_backend.plan`` and ``build``, saved, loaded back).

Phases, each in its own process (a fresh allocator and its own RSS high-water mark) unless ``--in-process``:
``prepare`` (sample, write the rows: exact's build; ground truth), ``build`` (the stored FAISS indexes),
``serve`` (open a back end, ``--warmup`` untimed queries, ``--queries`` timed one at a time, then all of them
as one batch). Recall@10 of a back end = mean over queries of |its 10 ids & exact's 10 ids| / 10; exact's
ground truth is its batched answer, checked against a brute-force float32 ``torch.topk`` of every size.
Memory (MB = 2^20 bytes) is read from /proc/self/status; see ``MEMORY_NOTE``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from measure import PeakMemory, machine_info, markdown_table, release_freed_memory

from cots.search import FORMAT, FORMAT_VERSION
from cots.search import faiss_backend as faiss_kinds
from cots.search.build import COPY_ROWS, software_versions
from cots.search.exact import ExactBackend, top_k
from cots.search.index import SearchIndex
from cots.search.layout import GenerationWriter, locked, next_generation

K = 10
BACKENDS = ("exact", "faiss flat", "faiss hnsw", "faiss ivf")
STORED_KINDS = ("hnsw", "ivf")  # what cots-index --faiss writes beside the rows
MEMORY_NOTE = (
    "build peak / serve peak: rise of the process's RSS high-water mark (VmHWM, reset at the start of the phase) "
    "above its RSS then, in the process of that phase; it counts pages of the memory-mapped rows that the phase "
    "touched (file-backed, reclaimable page cache: exact's gallery pages, the dirty pages of the rows written). "
    "mapped: file-backed RSS (RssFile) grown by the end of serving (the rows' pages read through the memory map, "
    "and code paged in on first use). open: anonymous RSS (RssAnon) grown by "
    "opening the back end, i.e. what the loaded index holds in RAM."
)


@dataclass
class Settings:
    """What one run measures; passed as JSON to each phase's process."""

    dim: int = 256
    clusters: int = 1000
    spread: tuple[float, float] = (0.5, 2.0)
    zipf: float = 1.0
    seed: int = 0
    queries: int = 200
    warmup: int = 10
    dtype: str = "float16"
    memory_budget_mb: float = 256.0


# -- data ------------------------------------------------------------------------------------------------
def mixture(s: Settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres (C, D) unit rows, spreads (C,), cluster probabilities (C,): the same for every size and seed."""
    gen = torch.Generator().manual_seed(s.seed)
    centres = torch.nn.functional.normalize(torch.randn(s.clusters, s.dim, generator=gen), dim=1)
    low, high = s.spread
    spreads = low * (high / low) ** torch.rand(s.clusters, generator=gen)
    weights = 1.0 / torch.arange(1, s.clusters + 1, dtype=torch.float64) ** s.zipf
    weights = weights[torch.randperm(s.clusters, generator=gen)]
    return centres, spreads, weights / weights.sum()


def sample(s: Settings, count: int, seed: int) -> torch.Tensor:
    """(count, D) float32 unit rows of the mixture, made in slices (no second copy of a 1M gallery)."""
    centres, spreads, weights = mixture(s)
    gen = torch.Generator().manual_seed(seed)
    rows = torch.empty(count, s.dim)
    for start in range(0, count, COPY_ROWS):
        n = min(COPY_ROWS, count - start)
        cluster = torch.multinomial(weights, n, replacement=True, generator=gen)
        noise = torch.randn(n, s.dim, generator=gen) * (spreads[cluster, None] / math.sqrt(s.dim))
        rows[start : start + n] = torch.nn.functional.normalize(centres[cluster] + noise, dim=1)
    return rows


def write_index(folder: Path, rows: torch.Tensor, dtype: str) -> dict:
    """An index folder as ``cots-index`` writes one (its ``_update`` less the encoding), of synthetic items."""
    count, dim = rows.shape
    folder.mkdir(parents=True, exist_ok=True)
    with locked(folder):
        writer = GenerationWriter(folder, next_generation(folder))
        embeddings = writer.embeddings(count, dim, dtype)
        for start in range(0, count, COPY_ROWS):
            embeddings[start : start + COPY_ROWS] = rows[start : start + COPY_ROWS].numpy().astype(dtype)
        embeddings.flush()
        del embeddings
        writer.write_json("paths", [f"synthetic/{i:07d}.png" for i in range(count)])
        now_ns = time.time_ns()
        writer.write_json("fingerprints", {"indexed": [[4096, now_ns, None]] * count, "skipped": []})
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        synthetic = {"path": None, "model_id": "synthetic", "checksum": "synthetic", "dtype": "float32"}
        return writer.commit(
            {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "model": {**synthetic, "embed_dim": dim},
                "embed_dim": dim,
                "count": count,
                "dtype": dtype,
                "root": str(folder),
                "source": {"kind": "synthetic", "path": None},
                "change_detection": "size_mtime_ns",
                "scanned_at_ns": now_ns,
                "skipped": {},
                "other_files": 0,
                "faiss": None,
                "created_at": now,
                "updated_at": now,
                "software": software_versions(),
            }
        )


# -- measurements ----------------------------------------------------------------------------------------
def _status_mb(key: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean over rows of |found row & truth row| / k; (Q, k) ids each, -1 (nothing found) never matches."""
    hits = [len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True)]
    return sum(hits) / (truth.shape[0] * truth.shape[1])


def prepare(s: Settings, size: int, work: Path) -> dict:
    """Sample, write the rows (exact's build), and the ground truth: exact's batched top-10, checked by brute force."""
    rows = sample(s, size, seed=s.seed + 1)
    queries = sample(s, s.queries + s.warmup, seed=s.seed + 2)  # held out: never in the index
    np.save(work / "queries.npy", queries.numpy())
    release_freed_memory()
    with PeakMemory("cpu") as memory:
        started = time.perf_counter()
        info = write_index(work / "index", rows, s.dtype)
        build_s = time.perf_counter() - started
    stored = SearchIndex.open(work / "index").embeddings
    timed = queries[: s.queries]
    truth_scores, truth = top_k(timed, stored, K, s.memory_budget_mb)  # the exact back end, all queries at once
    np.save(work / "exact_ids.npy", truth.numpy())
    dense = torch.from_numpy(np.asarray(stored, dtype=np.float32))  # the stored rows, as float32: N x D
    brute_scores, brute = (timed @ dense.t()).topk(K, dim=1)  # Q x K
    del dense
    _, unrounded = (timed @ rows.t()).topk(K, dim=1)  # against the float32 rows before float16 storage
    return {
        "build_s": build_s,
        "build_peak_mb": memory.peak_mb,
        "disk_mb": (work / "index" / info["files"]["embeddings"]).stat().st_size / 2**20,
        "brute_force_identical_lists": (brute == truth).all(dim=1).float().mean().item(),
        "brute_force_recall": recall(truth, brute),
        "brute_force_max_score_diff": (brute_scores - truth_scores).abs().max().item(),
        "float16_recall_vs_float32_rows": recall(truth, unrounded),
        "mean_top1_score": truth_scores[:, 0].mean().item(),
        "mean_top10_score": truth_scores[:, -1].mean().item(),
    }


def build_stored(s: Settings, size: int, work: Path, kind: str) -> dict:
    """``cots-index --faiss <kind>``'s index over the written rows: plan, build, save."""
    spec = faiss_kinds.plan(kind, size)
    rows = SearchIndex.open(work / "index").embeddings
    release_freed_memory()
    with PeakMemory("cpu") as memory:
        started = time.perf_counter()
        index = faiss_kinds.build(rows, spec)
        faiss_kinds.save(index, work / f"faiss-{kind}.index")
        build_s = time.perf_counter() - started
    return {
        "build_s": build_s,
        "build_peak_mb": memory.peak_mb,
        "disk_mb": (work / f"faiss-{kind}.index").stat().st_size / 2**20,
        "spec": spec,
    }


def open_backend(s: Settings, size: int, work: Path, backend: str):
    """The back end as ``Searcher`` makes it, and its spec (None for exact).

    ``backend``: one of :data:`BACKENDS`, or a FAISS one followed by search parameters that replace the planned
    ones (``"faiss hnsw efSearch=256"``: ``--search-params``).
    """
    rows = SearchIndex.open(work / "index").embeddings
    if backend == "exact":
        return ExactBackend(rows, s.memory_budget_mb), None
    _, kind, *overrides = backend.split()
    spec = faiss_kinds.plan(kind, size)
    spec["search_params"].update((name, int(value)) for name, value in (o.split("=") for o in overrides))
    index = faiss_kinds.build(rows, spec) if kind == "flat" else faiss_kinds.load(work / f"faiss-{kind}.index")
    return faiss_kinds.FaissBackend(index, spec), spec


def serve(s: Settings, size: int, work: Path, backend: str) -> dict:
    """Open a back end; single-query latencies, batch throughput and recall@10 against exact."""
    queries = torch.from_numpy(np.load(work / "queries.npy"))
    truth = torch.from_numpy(np.load(work / "exact_ids.npy"))
    timed, warmup = queries[: s.queries], queries[s.queries :]
    if backend != "exact":
        faiss_kinds.import_faiss()  # the library's pages and allocations are not the index's
    top_k(timed[:1], timed, K)  # nor are torch's first-call set-up and kernels
    release_freed_memory()
    anon, mapped = _status_mb("RssAnon"), _status_mb("RssFile")
    with PeakMemory("cpu") as memory:
        started = time.perf_counter()
        searcher, spec = open_backend(s, size, work, backend)
        open_s = time.perf_counter() - started
        open_mb = _status_mb("RssAnon") - anon
        for i in range(warmup.shape[0]):
            searcher.top_k(warmup[i : i + 1], K)
        seconds, found = [], []
        for i in range(timed.shape[0]):
            started = time.perf_counter()
            found.append(searcher.top_k(timed[i : i + 1], K)[1])
            seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
        batch_ids = searcher.top_k(timed, K)[1]
        batch_s = time.perf_counter() - started
        mapped_mb = _status_mb("RssFile") - mapped
    found = torch.cat(found)
    ms = sorted(1000 * t for t in seconds)
    return {
        "open_s": open_s,
        "p50_ms": statistics.median(ms),
        "p95_ms": ms[min(len(ms) - 1, math.ceil(0.95 * len(ms)) - 1)],
        "mean_ms": statistics.fmean(ms),
        "batch_qps": timed.shape[0] / batch_s,
        "recall": recall(found, truth),
        "batch_recall": recall(batch_ids, truth),
        "serve_peak_mb": memory.peak_mb,
        "open_mb": open_mb,
        "mapped_mb": mapped_mb,
        "spec": spec,
    }


PHASES = {"prepare": prepare, "build": build_stored, "serve": serve}


def run_phase(phase: str, s: Settings, size: int, work: Path, what: str | None, args) -> dict:
    """A phase in a fresh process (or in this one with ``--in-process``); {"error": ...} when it fails."""
    call = [size, work] + ([what] if what else [])
    if args.in_process:
        try:
            return PHASES[phase](s, *call)
        except Exception as err:  # a row says what failed instead of stopping the table
            return {"error": f"{type(err).__name__}: {err}"}
    spec = json.dumps({"phase": phase, "settings": asdict(s), "size": size, "work": str(work), "what": what})
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", spec], capture_output=True, text=True, timeout=args.timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_size(s: Settings, size: int, work: Path, args) -> tuple[list[dict], dict]:
    """The rows of one size (each back end, then ``--search-params`` variants of a stored one), and its checks."""
    work.mkdir(parents=True, exist_ok=True)
    prepared = run_phase("prepare", s, size, work, None, args)
    rows = []
    for backend in BACKENDS:
        kind = backend.split()[-1]
        row = {"size": size, "backend": backend}
        if "error" in prepared:
            rows.append({**row, "status": f"prepare failed: {prepared['error']}"})
            continue
        if backend == "exact":
            row.update({k: prepared[k] for k in ("build_s", "build_peak_mb", "disk_mb")})
        elif kind in STORED_KINDS:
            built = run_phase("build", s, size, work, kind, args)
            if "error" in built:
                rows.append({**row, "status": f"build failed: {built['error']}"})
                print(f"  {size:,} {backend}: {rows[-1]['status']}", flush=True)
                continue
            row.update(built)
        rows.append(served_row(s, size, work, row, backend, args))
        if backend == "faiss flat" and "open_s" in rows[-1]:
            rows[-1].update(build_s=rows[-1]["open_s"], disk_mb=None)  # built in memory at open: no file
        for name, value in args.search_params.get(kind, []):
            variant = f"{backend} {name}={value}"
            rows.append(served_row(s, size, work, {"size": size, "backend": variant}, variant, args))
            rows[-1]["status"] += " (search parameter changed; not the planned default)"
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows, prepared


def served_row(s: Settings, size: int, work: Path, row: dict, backend: str, args) -> dict:
    served = run_phase("serve", s, size, work, backend, args)
    row.update(served)
    spec = row.get("spec") or {}
    row["factory"] = spec.get("factory", "chunked matmul")
    row["params"] = " ".join(f"{k}={v}" for k, v in (spec.get("search_params") or {}).items())
    row["status"] = f"serve failed: {served['error']}" if "error" in served else "measured"
    recall_text = f"{row['recall']:.4f}" if "recall" in row else "-"
    print(f"  {size:,} {backend}: {row['status']}, recall@10 {recall_text}", flush=True)
    return row


COLUMNS = [
    ("rows", "size", ","),
    ("back end", "backend", ""),
    ("index", "factory", ""),
    ("search params", "params", ""),
    ("build s", "build_s", ".4g"),
    ("open s", "open_s", ".3g"),
    ("p50 ms", "p50_ms", ".4g"),
    ("p95 ms", "p95_ms", ".4g"),
    ("batch q/s", "batch_qps", ",.0f"),
    ("recall@10", "recall", ".4f"),
    ("build peak MB", "build_peak_mb", ".0f"),
    ("open MB", "open_mb", ".0f"),
    ("serve peak MB", "serve_peak_mb", ".0f"),
    ("mapped MB", "mapped_mb", ".0f"),
    ("disk MB", "disk_mb", ".1f"),
    ("status", "status", ""),
]
CHECK_COLUMNS = [
    ("rows", "size", ","),
    ("identical top-10 lists (exact vs torch.topk)", "brute_force_identical_lists", ".4f"),
    ("recall@10 exact vs torch.topk", "brute_force_recall", ".4f"),
    ("max score diff", "brute_force_max_score_diff", ".2g"),
    ("recall@10 float16 rows vs float32 rows", "float16_recall_vs_float32_rows", ".4f"),
    ("mean top-1 cosine", "mean_top1_score", ".3f"),
    ("mean 10th cosine", "mean_top10_score", ".3f"),
]


def machine_facts() -> dict:
    info = machine_info("cpu")
    faiss = faiss_kinds.import_faiss()
    info.update(
        cpu=_cpu_model(),
        numpy=np.__version__,
        faiss=faiss.__version__,
        faiss_threads=faiss.omp_get_max_threads(),
        memory_gb=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        load_average=os.getloadavg(),
        platform=platform.platform(),
    )
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        info["commit"] = head.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None)
    except OSError:
        return None


def report(s: Settings, rows: list[dict], checks: list[dict], machine: dict, args, seconds: float) -> str:
    m = machine
    low, high = s.spread
    return "\n".join(
        [
            "# Search: exact against FAISS (`bench/search.py`)",
            "",
            f"`{args.command}` in {duration(seconds)} on {m['cpu_count']} cores ({m['cpu']}), "
            f"{m['memory_gb']:.0f} GiB, torch {m['torch']} ({m['torch_threads']} threads), faiss {m['faiss']} "
            f"({m['faiss_threads']} threads), numpy {m['numpy']}, Python {m['python']}, commit {m['commit']}, "
            f"load average {m['load_average'][0]:.2f} at the start (a machine shared with other jobs).",
            "",
            f"Data: synthetic, clustered (not uniform noise): {s.clusters} Gaussian clusters on the sphere in "
            f"D = {s.dim}, Zipf({s.zipf:g}) cluster sizes, spreads log-uniform in [{low:g}, {high:g}]; rows stored "
            f"{s.dtype} as `cots-index` stores them. {s.queries} held-out queries of the same mixture, k = {K}, "
            f"one at a time after {s.warmup} warm-up queries (p50/p95 latency), then all {s.queries} as one batch "
            "(batch q/s). Warm page cache (the rows were just written). Recall@10 against exact's top-10; "
            "approximate recall depends on this distribution.",
            "",
            "build s: exact = writing the rows (float16 memmap, paths, fingerprints, index.json, fsync); "
            "hnsw/ivf = FAISS build + save on top of that (as `cots-index --faiss`); flat = built in memory when "
            "the searcher opens (nothing stored). open s: `SearchIndex.open` + the back end (the FAISS file read "
            "for hnsw/ivf). disk MB: exact = the rows file; hnsw/ivf = the FAISS file, kept beside the rows. "
            "A back end named with a search parameter (`--search-params`) is the stored index searched with that "
            "value instead of the one `faiss_backend.plan` gives (what `cots-search` uses).",
            "",
            markdown_table(rows, COLUMNS),
            "",
            "Memory: "
            + MEMORY_NOTE
            + (
                " All phases ran in one process (--in-process): indicative only."
                if args.in_process
                else " Each phase ran in its own process."
            ),
            "",
            "Ground truth: exact's batched top-10 (the table's exact row is its single-query answers against it), "
            "against a brute-force float32 `torch.topk` over the same stored rows, and what float16 storage costs "
            "against the float32 rows before rounding:",
            "",
            markdown_table(checks, CHECK_COLUMNS),
            "",
        ]
    )


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# -- entry point -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=None, help="rows per index, comma-separated (default 10000,100000,1000000)")
    parser.add_argument("--queries", type=int, default=None, help="timed single queries (default 200; quick 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed queries first (default 10; quick 2)")
    parser.add_argument("--dim", type=int, default=256, help="embedding dimension (conf/model: embed_dim 256)")
    parser.add_argument("--clusters", type=int, default=1000, help="Gaussian clusters of the synthetic rows")
    parser.add_argument("--spread", default="0.5,2", help="low,high: each cluster's spread, log-uniform")
    parser.add_argument("--zipf", type=float, default=1.0, help="cluster sizes ~ 1 / rank^zipf (0: equal)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="row storage")
    parser.add_argument("--memory-budget-mb", type=float, default=256.0, help="exact search's chunk budget")
    parser.add_argument(
        "--search-params",
        default="",
        help="extra rows with other FAISS search parameters, e.g. hnsw:efSearch=128,hnsw:efSearch=256,ivf:nprobe=32",
    )
    parser.add_argument("--quick", action="store_true", help="sizes 1000,4000, 20 queries: a few seconds")
    parser.add_argument(
        "--out", type=lambda v: Path(v) if v else None, default="bench/results/search.md", help="markdown + .json twin"
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="where the indexes are written (default: a temp)")
    parser.add_argument("--keep", action="store_true", help="keep the indexes written")
    parser.add_argument("--in-process", action="store_true", help="no process per phase (tests; rougher memory)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds a phase may take")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.sizes = [int(n) for n in (args.sizes or ("1000,4000" if args.quick else "10000,100000,1000000")).split(",")]
    args.queries = args.queries or (20 if args.quick else 200)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 10)
    args.search_params = parse_search_params(args.search_params)
    args.command = " ".join(["python bench/search.py", *(argv if argv is not None else sys.argv[1:])])
    return args


def parse_search_params(text: str) -> dict[str, list[tuple[str, int]]]:
    """``"hnsw:efSearch=128,ivf:nprobe=32"`` -> {"hnsw": [("efSearch", 128)], "ivf": [("nprobe", 32)]}."""
    params: dict[str, list[tuple[str, int]]] = {}
    for item in filter(None, text.split(",")):
        kind, _, assignment = item.partition(":")
        name, _, value = assignment.partition("=")
        if kind not in STORED_KINDS or not name or not value.isdigit():
            raise SystemExit(f"--search-params: {item!r} is not hnsw|ivf:<name>=<integer>")
        params.setdefault(kind, []).append((name, int(value)))
    return params


def settings_of(args) -> Settings:
    low, high = (float(x) for x in args.spread.split(","))
    return Settings(
        dim=args.dim,
        clusters=args.clusters,
        spread=(low, high),
        zipf=args.zipf,
        seed=args.seed,
        queries=args.queries,
        warmup=args.warmup,
        dtype=args.dtype,
        memory_budget_mb=args.memory_budget_mb,
    )


def worker(spec: str) -> dict:
    job = json.loads(spec)
    s = Settings(**{**job["settings"], "spread": tuple(job["settings"]["spread"])})
    call = [s, job["size"], Path(job["work"])] + ([job["what"]] if job["what"] else [])
    result = PHASES[job["phase"]](*call)
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    release_freed_memory()
    if args.worker:
        return worker(args.worker)
    s = settings_of(args)
    started = time.perf_counter()
    machine = machine_facts()
    temp = None if args.work_dir else tempfile.mkdtemp(prefix="cots-search-bench-")
    work = args.work_dir or Path(temp)
    rows, checks = [], []
    try:
        for size in args.sizes:
            print(f"{size:,} rows", flush=True)
            size_rows, prepared = measure_size(s, size, work / str(size), args)
            rows += size_rows
            checks.append({"size": size, **prepared})
    finally:
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    seconds = time.perf_counter() - started
    text = report(s, rows, checks, machine, args, seconds)
    print("\n" + text)
    result = {
        "machine": machine,
        "settings": asdict(s),
        "command": args.command,
        "in_process": args.in_process,
        "seconds": seconds,
        "memory_note": MEMORY_NOTE,
        "rows": rows,
        "checks": checks,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return result


if __name__ == "__main__":
    main()
