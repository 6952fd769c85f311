"""Build the ``dall_e`` Encoder/Decoder from plain hyper-parameters.

Why a wrapper instead of calling ``dall_e.Encoder(...)`` directly:

* ``dall_e`` validators demand n_hid >= 64 and vocab_size >= 512 (the official
  scale). Tests and small datasets need smaller models, so we check our own,
  looser constraints and build with attrs validators disabled.
* ``dall_e.utils.Conv2d`` silently casts inputs and weights to float16 on CUDA
  (``use_float16=True``). Token targets must not depend on the device, so every
  conv is switched to float32.
* The ``requires_grad`` and ``device`` attrs only affect the tensors created at
  construction: ``nn.Parameter`` re-enables grad anyway, and ``forward`` follows
  the weights' device, so ``.to()`` / ``requires_grad_()`` work as usual.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import attr
import torch
from dall_e import Decoder, Encoder
from dall_e.utils import Conv2d

DOWNSAMPLE = 8  # three 2x max-pools in the Encoder; three 2x upsamples in the Decoder


@dataclass(frozen=True)
class DVAEArch:
    """Architecture hyper-parameters shared by Encoder and Decoder.

    Defaults are the official DALL-E dVAE (n_hid=256, 2 blocks/group, 8192 codes).
    """

    n_hid: int = 256
    n_blk_per_group: int = 2
    vocab_size: int = 8192
    input_channels: int = 3
    n_init: int = 128  # Decoder only: width of the 1x1 conv reading the one-hot codes

    def __post_init__(self) -> None:
        if self.n_hid < 4 or self.n_hid % 4:
            raise ValueError(f"n_hid must be a positive multiple of 4 (blocks use n_hid // 4), got {self.n_hid}")
        if self.n_blk_per_group < 1:
            raise ValueError(f"n_blk_per_group must be >= 1, got {self.n_blk_per_group}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if self.input_channels < 1 or self.n_init < 1:
            raise ValueError(f"input_channels and n_init must be >= 1, got {self.input_channels}, {self.n_init}")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DVAEArch:
        known = {f: int(values[f]) for f in cls.__dataclass_fields__ if f in values}
        return cls(**known)


def _float32_convs(module: torch.nn.Module) -> torch.nn.Module:
    for sub in module.modules():
        if isinstance(sub, Conv2d):
            sub.use_float16 = False
    return module


def build_encoder(arch: DVAEArch) -> Encoder:
    """A randomly initialised ``dall_e.Encoder``: (B, C, S, S) -> logits (B, vocab, S/8, S/8)."""
    with attr.validators.disabled():
        enc = Encoder(
            n_hid=arch.n_hid,
            n_blk_per_group=arch.n_blk_per_group,
            input_channels=arch.input_channels,
            vocab_size=arch.vocab_size,
        )
    return _float32_convs(enc)


def build_decoder(arch: DVAEArch) -> Decoder:
    """A randomly initialised ``dall_e.Decoder``: (B, vocab, h, w) -> (B, 2*C, 8h, 8w).

    The 2*C outputs are the logit-Laplace (mu, log b) pairs of the paper; our
    trainer uses sigmoid(first C channels) as the reconstruction mean.
    """
    with attr.validators.disabled():
        dec = Decoder(
            n_init=arch.n_init,
            n_hid=arch.n_hid,
            n_blk_per_group=arch.n_blk_per_group,
            output_channels=arch.input_channels,
            vocab_size=arch.vocab_size,
        )
    return _float32_convs(dec)


def infer_encoder_arch(state: dict[str, torch.Tensor]) -> DVAEArch:
    """Recover Encoder hyper-parameters from its state-dict shapes (keys ``blocks.*``).

    Args:
        state: Encoder state dict; ``blocks.input.w`` is (n_hid, C, 7, 7) and
            ``blocks.output.conv.w`` is (vocab, 8*n_hid, 1, 1).
    """
    for key in ("blocks.input.w", "blocks.output.conv.w"):
        if key not in state:
            raise KeyError(f"not a dall_e Encoder state dict: missing {key!r} (found e.g. {sorted(state)[:3]})")
    n_hid, channels = state["blocks.input.w"].shape[:2]
    vocab = state["blocks.output.conv.w"].shape[0]
    blocks = {m.group(1) for k in state if (m := re.match(r"blocks\.group_1\.(block_\d+)\.", k))}
    return DVAEArch(n_hid=int(n_hid), n_blk_per_group=len(blocks), vocab_size=int(vocab), input_channels=int(channels))


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict`` with an error that names missing/unexpected keys and bad shapes.

    Args:
        module: the freshly built module.
        state: tensors to load (keys as in ``module.state_dict()``).
        what: name used in the error, e.g. the file path.
    """
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {missing[:8]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {unexpected[:8]}")
        if shapes:
            parts.append(f"shape mismatch: {shapes[:8]}")
        raise ValueError(f"{what}: state dict does not match {type(module).__name__}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)
