"""Momentum (EMA) copies of the online encoders (METHOD §2).

The update runs once per optimizer step; the LightningModule calls it from
``optimizer_step`` so that gradient accumulation does not multiply it.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def momentum_copy(module: nn.Module) -> nn.Module:
    """A frozen deep copy: same weights, no gradients, never in an optimizer."""
    twin = copy.deepcopy(module)
    twin.requires_grad_(False)
    return twin


def parameter_pairs(online: nn.Module, momentum: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Matching (momentum, online) parameter lists, checked by name once.

    Frozen online parameters are left out: they never change, so their momentum twins
    (copied at start) stay equal to them without an update every step.
    """
    targets, sources = [], []
    for (name_m, p_m), (name_o, p_o) in zip(momentum.named_parameters(), online.named_parameters(), strict=True):
        if name_m != name_o:
            raise RuntimeError(f"momentum encoder out of sync with online encoder: {name_m} vs {name_o}")
        if p_o.requires_grad:
            targets.append(p_m)
            sources.append(p_o)
    return targets, sources


@torch.no_grad()
def ema_update_(targets: list[torch.Tensor], sources: list[torch.Tensor], m: float) -> None:
    """theta_hat <- m * theta_hat + (1 - m) * theta, in place on ``targets``.

    Uses the ``_foreach`` kernels: one launch per group of tensors instead of one per tensor.
    """
    if targets:
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, sources, alpha=1.0 - m)


def momentum_at(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """Momentum coefficient for an optimizer step.

    ``constant`` keeps ``base``; ``cosine`` raises it from ``base`` to 1 over the run (BYOL / MoCo v3).
    """
    if schedule == "constant" or total_steps <= 0:
        return base
    if schedule == "cosine":
        progress = min(step / total_steps, 1.0)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0
    raise ValueError(f"unknown momentum schedule '{schedule}' (expected 'constant' or 'cosine')")
