"""What the performance benchmarks share: config composition, peak memory, matmul rate, FLOP counts, tables.

Nothing here imports Lightning (nor ``cots.train``, which does): ``bench/step_speed.py`` runs on
machines that have only PyTorch, timm, transformers and the Hydra wheels.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.utils.flop_counter as flop_counter

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
MB = 2**20


def compose_config(overrides: Sequence[str]):
    """The ``train`` config with ``overrides``, as ``cots-train`` would build it (no run dir, no Lightning)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def autocast(device: str, precision: str):
    """bf16 autocast for ``precision='bf16'``, nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return nullcontext()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def release_freed_memory() -> None:
    """Make glibc return freed tensors to the OS, so that one phase's RSS does not hide in the next one's.

    A fixed mmap threshold turns off glibc's dynamic threshold, which would otherwise serve large
    tensors from the heap after the first free and keep them there.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 20)
    libc.mallopt(m_trim_threshold, 1 << 20)


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory of a block of code, as ``peak_mb`` (above the start) and ``peak_abs_mb``.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensors only, not the
    allocator's cache). CPU: the process RSS high-water mark, Linux ``VmHWM`` after resetting it through
    ``/proc/self/clear_refs`` (method ``rss_hwm``); without that, ``getrusage`` max RSS (method
    ``ru_maxrss``, which cannot be reset: a phase smaller than an earlier one reads as 0 above its start).
    """

    def __init__(self, device: str) -> None:
        self.device = device
        self.method = ""
        self.start_mb = self.peak_abs_mb = self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.method = "cuda_max_memory_allocated"
            self.start_mb = torch.cuda.memory_allocated() / MB
        else:
            self.method = "rss_hwm" if _reset_peak_rss() and _status_kb("VmHWM") is not None else "ru_maxrss"
            rss = _status_kb("VmRSS")
            self.start_mb = rss / 1024 if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_abs_mb = torch.cuda.max_memory_allocated() / MB
        elif self.method == "rss_hwm":
            self.peak_abs_mb = _status_kb("VmHWM") / 1024
        else:
            self.peak_abs_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
        self.peak_mb = max(self.peak_abs_mb - self.start_mb, 0.0)

    def as_dict(self) -> dict:
        return {"peak_mem_mb": self.peak_mb, "peak_mem_abs_mb": self.peak_abs_mb, "mem_method": self.method}


def matmul_rate(device: str, precision: str, n: int, reps: int = 5) -> dict:
    """FLOP/s of an (n x n) @ (n x n) ``torch.mm``: fp32, or bf16 under autocast; best and median of ``reps``.

    The bf16 operands are made in bf16, so that autocast's casts of the inputs are not timed.
    """
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = []
    with autocast(device, precision):
        torch.mm(a, b)  # warm-up (kernel selection, bf16 casts)
        for _ in range(reps):
            synchronize(device)
            start = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
    flops = 2 * n**3
    return {
        "n": n,
        "precision": precision,
        "best_flops_per_s": flops / min(seconds),
        "median_flops_per_s": flops / statistics.median(seconds),
    }


def _cpu_flash_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_flash_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_flop_formulas() -> dict:
    """SDPA's CPU kernels, which FlopCounterMode does not count (it knows the CUDA ones)."""
    aten = torch.ops.aten
    extra = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flop
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        extra[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_flash_attention_backward_flop
    return {op: f for op, f in extra.items() if op not in flop_counter.flop_registry}


def count_flops(fn: Callable[[], object]) -> tuple[int, dict[str, int], object]:
    """FLOPs of one call of ``fn`` (matmuls, convolutions, attention; forward and backward).

    Returns the total, the count by op, and what ``fn`` returned.
    """
    with flop_counter.FlopCounterMode(display=False, custom_mapping=_extra_flop_formulas()) as counter:
        result = fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return int(counter.get_total_flops()), by_op, result


def time_calls(fn: Callable[[], object], device: str, warmup: int, steps: int) -> list[float]:
    """Seconds of each of ``steps`` calls after ``warmup`` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def machine_info(device: str) -> dict:
    info = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device == "cuda":
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            gpu_memory_gb=torch.cuda.get_device_properties(0).total_memory / 2**30,
        )
    return info


def memory_available_bytes() -> int:
    """MemAvailable of /proc/meminfo (the memory a new allocation can get without swapping)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a markdown table; ``columns`` are (header, key, format spec)."""

    def cell(row: dict, key: str, spec: str) -> str:
        value = row.get(key)
        if value is None:
            return "–"
        if isinstance(value, (int, float)) and spec:
            return format(value, spec)
        return str(value)

    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, s) for _, k, s in columns) + " |" for r in rows]
    return "\n".join(lines)


def si(value: float, unit: str = "") -> str:
    """1.23e12 -> '1.23 T' (+ unit)."""
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def write_json(path: Path | None, result: dict) -> None:
    """Write a benchmark's result (no-op without a path)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {path}")
