"""The picture of the Adaptive Momentum Filter: histogram of Q^s, fitted Gaussian, threshold."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cots.amf import gaussian_fit


def similarity_histogram(values: torch.Tensor, k: float, title: str = "") -> Figure:
    """Histogram of the similarity queue (N,) with the Gaussian fitted to it and the line mu - k sigma.

    Built on the Agg canvas directly (no pyplot): safe in headless and multi-threaded runs.
    """
    values = values.detach().float().cpu()
    mean, std = (float(x) for x in gaussian_fit(values, torch.ones_like(values, dtype=torch.bool)))
    threshold = mean - k * std
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bins = int(min(60, max(10, math.sqrt(len(values)))))
    ax.hist(values.numpy(), bins=bins, density=True, color="#8fb3d9", label=f"Q^s ({len(values)} pairs)")
    if std > 0:
        lo, hi = min(float(values.min()), mean - 4 * std), max(float(values.max()), mean + 4 * std)
        xs = torch.linspace(lo, hi, 200)
        pdf = torch.exp(-0.5 * ((xs - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        ax.plot(xs.numpy(), pdf.numpy(), color="#1f4e79", label=f"N(mu={mean:.3f}, sigma={std:.3f})")
    below = float((values < threshold).float().mean()) if len(values) else 0.0
    ax.axvline(
        threshold, color="#c0392b", linestyle="--", label=f"mu - {k:g} sigma = {threshold:.3f} ({below:.1%} below)"
    )
    ax.set_xlabel("momentum similarity of positive pairs  s = zhat_v . zhat_t")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


class AMFHistogram(L.Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end), on rank 0, draw the similarity queue.

    The PNG goes to ``<trainer.default_root_dir>/amf/step_XXXXXX.png`` and, when a
    TensorBoardLogger is attached, to TensorBoard as ``amf/similarity_queue``. Does nothing when
    AMF is off or Q^s is still empty.
    """

    def __init__(self, every_n_steps: int = 500) -> None:
        if every_n_steps < 1:
            raise ValueError(f"callbacks.amf_histogram.every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._last_step = -1

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # Called per micro-batch; draw once per optimizer step.
        step = trainer.global_step
        if step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.draw(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step != self._last_step:
            self.draw(trainer, module)

    def draw(self, trainer, module) -> Path | None:
        self._last_step = step = trainer.global_step
        amf = getattr(module, "amf", None)
        if amf is None or not trainer.is_global_zero:
            return None
        values = amf.similarity_queue.ordered()
        if len(values) == 0:
            return None
        queue = amf.similarity_queue
        fig = similarity_histogram(
            values, amf.k, f"AMF similarity queue, step {step} ({int(queue.filled)}/{queue.size})"
        )
        path = Path(trainer.default_root_dir) / "amf" / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("amf/similarity_queue", fig, global_step=step, close=False)
        return path
