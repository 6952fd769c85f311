"""Callbacks that belong to every run: throughput measurement and crash-recovery checkpoints."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

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


class RecoveryCheckpoint(L.Callback):
    """``last.ckpt`` for crash recovery, whatever the model-selection checkpoint monitors.

    Written every ``every_n_steps`` optimizer steps and/or every ``every_minutes`` of training, and
    when training ends; always at an optimizer-step boundary (never inside an accumulation window).
    Lightning writes it atomically (a temporary file, then a rename), so a kill at any moment leaves
    the previous ``last.ckpt`` intact. ``ModelCheckpoint`` keeps only the best by ``val/rsum``: it
    can save nothing until a validation has run, which at paper scale is an epoch away.

    Args:
        dirpath: folder of ``last.ckpt``.
        every_n_steps: save when the optimizer step is a multiple of this (None: off).
        every_minutes: save when this much wall time passed since the last save (None: off). Rank 0's
            clock decides for every rank (a save is collective).
        filename: the file's stem.
    """

    def __init__(
        self, dirpath: str, every_n_steps: int | None = None, every_minutes: float | None = None, filename: str = "last"
    ) -> None:
        for name, value in (("every_n_steps", every_n_steps), ("every_minutes", every_minutes)):
            if value is not None and not value > 0:
                raise ValueError(f"callbacks.recovery_checkpoint.{name} must be positive or null, got {value!r}")
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self._saved_step: int | None = None
        self._seen_step: int | None = None
        self._last_save_time = time.monotonic()

    def on_train_start(self, trainer, module) -> None:
        self._seen_step = trainer.global_step  # a resumed run does not save again the step it resumed from
        self._saved_step = trainer.global_step
        self._last_save_time = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # no optimizer step in this batch (accumulation)
            return
        self._seen_step = step
        due = bool(self.every_n_steps) and step % self.every_n_steps == 0
        if self.every_minutes is not None:
            late = time.monotonic() - self._last_save_time >= 60 * self.every_minutes
            due = trainer.strategy.broadcast(due or late)  # every rank takes the same branch
        if due:
            self.save(trainer)

    def on_train_end(self, trainer, module) -> None:
        self.save(trainer)

    def save(self, trainer) -> None:
        """Write ``last.ckpt`` at this step (once per step; on every rank, as Lightning requires)."""
        if trainer.global_step == self._saved_step or trainer.sanity_checking or trainer.fast_dev_run:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # everything a resume needs
        self._saved_step = trainer.global_step
        self._last_save_time = time.monotonic()
