"""Mixed precision on CPUs: bf16 only where the CPU computes it natively.

On a CPU with AVX512 (AVX512-BF16 / AMX) oneDNN runs bf16 matrix products natively, and
``bf16-mixed`` is faster than fp32 (1.4x for the emoji demo). On an AVX2-only CPU the same
products are emulated: the demo's step measured 3.4 s in fp32 and over 35 s in bf16 on a 2-core
AMD EPYC. A config that asks for bf16 on such a CPU trains in ``32-true`` instead, and says so,
unless ``cpu_bf16_fallback=false`` (to reproduce bf16 numerics at any cost).
"""

from __future__ import annotations

import torch
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, open_dict


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN's own test: AVX512 core or newer)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def trains_on_cpu(trainer_cfg: DictConfig) -> bool:
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def fall_back_from_emulated_bf16(cfg: DictConfig) -> str | None:
    """Set ``trainer.precision`` to ``32-true`` where bf16 would be emulated on this CPU; returns the message."""
    precision = str(cfg.trainer.get("precision"))
    if not (precision.startswith("bf16") and trains_on_cpu(cfg.trainer)) or native_cpu_bf16():
        return None
    if not cfg.get("cpu_bf16_fallback", True):
        return None
    message = (
        f"trainer.precision={precision} on a CPU without native bf16 ({torch.backends.cpu.get_cpu_capability()}): "
        "its matrix products would be emulated (the emoji demo's step: 3.4 s in fp32, over 35 s in bf16 on an "
        "AVX2 CPU); training in 32-true instead "
        "(cpu_bf16_fallback=false keeps bf16)"
    )
    with open_dict(cfg):
        cfg.trainer.precision = "32-true"
    rank_zero_warn(message)
    return message
