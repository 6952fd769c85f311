"""Callbacks that belong to every run: throughput measurement."""
from __future__ import annotations

import statistics
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


class StepTimer(L.Callback):
    """Wall time per training batch and pairs/s (all ranks together), logged and summarised at the end.

    The first ``warmup`` batches are left out of the summary (allocation, lazy initialisation).
    Times are host-side: on GPUs they are exact over many steps because the queue of kernels
    cannot run ahead by more than a few steps.
    """

    def __init__(self, warmup: int = 5) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        elapsed = time.perf_counter() - self._start
        self.times.append(elapsed)
        pairs = batch["images"].shape[0] * trainer.world_size
        module.log("perf/step_ms", 1000 * elapsed, batch_size=pairs)
        module.log("perf/pairs_per_s", pairs / max(elapsed, 1e-9), batch_size=pairs)

    def median_step_seconds(self) -> float | None:
        timed = self.times[self.warmup :] or self.times
        return statistics.median(timed) if timed else None

    def on_train_end(self, trainer, module) -> None:
        median = self.median_step_seconds()
        if median is not None:
            rank_zero_info(f"median training step: {1000 * median:.1f} ms over {len(self.times)} batches")
