"""A callback that kill -9s its run's process group at a chosen optimizer step (crash-resume tests).

In a module of its own, without the test suite's imports: ddp_spawn workers unpickle it, and importing
``conftest`` there would set their torch threads (the float summation order) to the test process's.
"""

from __future__ import annotations

import os
import signal

import lightning as L


class KillProcessGroupAt(L.Callback):
    """kill -9 of the run's whole process group (the ddp_spawn workers too) when optimizer step ``step`` starts.

    The run is the uninterrupted run's config, so it has saved last.ckpt at every multiple of
    ``every_n_steps`` before ``step`` with that run's schedule; the kill lands at a chosen step
    whatever the machine's load (a parent polling for the file could land anywhere after it).
    """

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.killpg(os.getpgrp(), signal.SIGKILL)
