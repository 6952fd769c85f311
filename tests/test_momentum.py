"""EMA of the momentum encoder: formula, frozen parameters, schedule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cots.momentum import ema_update_, momentum_at, momentum_copy, parameter_pairs


def test_ema_formula_and_frozen_parameters_are_skipped():
    online = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    online[0].requires_grad_(False)  # e.g. a frozen pretrained text tower
    twin = momentum_copy(online)
    assert all(not p.requires_grad for p in twin.parameters())
    targets, sources = parameter_pairs(online, twin)
    assert len(targets) == 2  # weight and bias of the trainable layer only
    with torch.no_grad():
        for p in online.parameters():
            p.add_(1.0)
    before = [p.clone() for p in twin.parameters()]
    ema_update_(targets, sources, 0.9)
    torch.testing.assert_close(twin[1].weight, 0.9 * before[2] + 0.1 * online[1].weight)
    torch.testing.assert_close(twin[0].weight, before[0])  # untouched


def test_mismatched_twin_is_rejected():
    with pytest.raises(RuntimeError, match="out of sync"):
        parameter_pairs(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Identity(), nn.Linear(2, 2)))


def test_momentum_schedules():
    assert momentum_at(10, 100, 0.995, "constant") == 0.995
    assert momentum_at(0, 100, 0.99, "cosine") == pytest.approx(0.99)
    assert momentum_at(100, 100, 0.99, "cosine") == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown momentum schedule"):
        momentum_at(0, 10, 0.9, "linear")
