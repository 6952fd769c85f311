"""Run guards: non-finite losses and too many unusable samples stop a run with a clear message."""

from __future__ import annotations

from collections import Counter

import torch

from cots import distributed


class RunGuardError(RuntimeError):
    """The run cannot go on usefully; the message says why and what to look at."""


def all_ranks_finite(loss: torch.Tensor) -> bool:
    """True when the loss is finite on every rank (one host sync; all ranks agree, so they skip together)."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return bool(distributed.all_reduce_sum(bad).item() == 0)


class NonFiniteGuard:
    """Counts skipped non-finite steps; too many in a row stops the run.

    Args:
        max_consecutive: stop after this many non-finite steps in a row.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def record(self, finite: bool, terms: dict[str, torch.Tensor], step: int) -> None:
        if finite:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise RunGuardError(
                f"{self.consecutive} consecutive non-finite losses (step {step}; last terms: {values}); "
                "lower optim.optimizer.lr, check the data, or raise module.max_nonfinite_steps"
            )


def check_skip_fraction(skipped: Counter, seen: int, max_fraction: float, min_samples: int = 64) -> None:
    """Stop when more than ``max_fraction`` of the samples read so far could not be used."""
    total_skipped = sum(skipped.values())
    total = seen + total_skipped
    if total >= min_samples and total_skipped > max_fraction * total:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped.most_common())
        raise RunGuardError(
            f"{total_skipped} of {total} training samples were unusable ({reasons}), more than "
            f"module.max_skip_fraction={max_fraction}; fix the data or raise the limit"
        )


def assert_finite_parameters(module: torch.nn.Module) -> None:
    """Refuse to write a checkpoint of non-finite weights (the previous good one stays intact)."""
    bad = [name for name, p in module.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise RunGuardError(
            f"not writing a checkpoint: non-finite weights in {bad[:5]}{' ...' if len(bad) > 5 else ''}"
        )
