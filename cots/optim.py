"""Parameter groups and learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn


def param_groups(
    module: nn.Module, weight_decay: float, base_lr: float | None = None, lr_scale: Mapping[str, float] | None = None
) -> list[dict]:
    """Decay matrices; not biases, norms, embeddings of size 1xW, tokens or the temperature.

    Args:
        lr_scale: ``{parameter-name prefix: multiplier of base_lr}`` (nested mappings join with dots),
            the longest matching prefix winning, e.g. ``{"encoder": {"text_tower": 0.2}}`` for a
            pretrained text tower next to a vision tower trained from scratch. Groups are
            (decay, scale) pairs in order of first use.
    """
    lr_scale = _flatten(lr_scale or {})
    if lr_scale and base_lr is None:
        raise ValueError("optim.lr_scale needs the optimizer's base lr")
    names = {name for name, _ in module.named_parameters()}
    for prefix, scale in lr_scale.items():
        if not any(name == prefix or name.startswith(prefix + ".") for name in names):
            raise ValueError(f"optim.lr_scale: no parameter is named '{prefix}' or '{prefix}.*'")
        if not scale >= 0:
            raise ValueError(f"optim.lr_scale.{prefix} must be >= 0, got {scale}")
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (
            param.ndim < 2 or name.endswith(("cls_token", "pos_embed", "mask_embedding")) or "log_temperature" in name
        )
        matches = [p for p in lr_scale if name == p or name.startswith(p + ".")]
        scale = float(lr_scale[max(matches, key=len)]) if matches else 1.0
        groups.setdefault((decay, scale), []).append(param)
    out = []
    for (decay, scale), params in groups.items():
        if not params and scale != 1.0:
            continue
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if scale != 1.0:
            group["lr"] = base_lr * scale
        out.append(group)
    return out


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, float]:
    """{"encoder": {"text_tower": 0.2}} -> {"encoder.text_tower": 0.2} (what ``+optim.lr_scale.a.b=x`` composes)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        flat.update(_flatten(value, name) if isinstance(value, Mapping) else {name: float(value)})
    return flat


def build_optimizer(factory: Callable, module: nn.Module, lr_scale: Mapping[str, float] | None = None):
    """The config's partial optimizer over :func:`param_groups` (weight decay and lr read from the partial)."""
    keywords = getattr(factory, "keywords", {})
    return factory(param_groups(module, keywords.get("weight_decay", 0.0), keywords.get("lr"), lr_scale))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up then cosine decay to ``min_lr_ratio`` x the base rate, stepped per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
