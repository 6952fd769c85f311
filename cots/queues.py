"""Ring-buffer queues of momentum features (METHOD §2–3).

Every tensor is a registered buffer, so a queue lives in checkpoints and moves
with the module. Enqueue never asserts and never syncs with the host: the
write positions are computed on the device, with wrap-around.
"""

from __future__ import annotations

import torch
from torch import nn


class RingQueue(nn.Module):
    """Fixed-size FIFO of rows, newest overwriting oldest.

    Args:
        size: number of rows K.
        row_shape: shape of one row, e.g. ``(D,)`` for features or ``()`` for scalars.
        dtype: of the rows (float32 features and similarities, int64 pair groups).
    """

    def __init__(self, size: int, row_shape: tuple[int, ...] = (), dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be positive, got {size}")
        self.size = size
        self.register_buffer("data", torch.zeros(size, *row_shape, dtype=dtype))  # K x row_shape
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))  # next row to write
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))  # rows holding data

    @torch.no_grad()
    def enqueue(self, rows: torch.Tensor) -> None:
        """Write ``rows`` (N, *row_shape) at the pointer, wrapping around the end."""
        n = rows.shape[0]
        if n == 0:
            return
        if n > self.size:  # only the newest K rows can survive
            rows, n = rows[-self.size :], self.size
        index = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size
        self.data.index_copy_(0, index, rows.to(self.data.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))

    def valid_mask(self) -> torch.Tensor:
        """(K,) bool: True for rows that hold data."""
        return torch.arange(self.size, device=self.data.device) < self.filled

    def is_full(self) -> torch.Tensor:
        """0-dim bool tensor (no host sync)."""
        return self.filled >= self.size

    def ordered(self) -> torch.Tensor:
        """Rows from oldest to newest (for inspection and tests; not on the hot path)."""
        n = int(self.filled)
        if n < self.size:
            return self.data[:n]
        return torch.roll(self.data, shifts=-int(self.ptr), dims=0)


NO_GROUP = -1  # the pair group of a key whose batch carried none: it matches no query


class PairedFeatureQueue(nn.Module):
    """Image and text momentum features of the same past pairs: row j of both comes from one pair,
    and row j of ``groups`` is that pair's group (``data.pair_groups``; ``NO_GROUP`` when unknown).

    Args:
        size: K, the number of past pairs kept.
        dim: D, the embedding width.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.image = RingQueue(size, (dim,))
        self.text = RingQueue(size, (dim,))
        self.groups = RingQueue(size, (), dtype=torch.long)

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Append gathered momentum features, image_keys and text_keys both (N, D), and their groups (N,)."""
        self.image.enqueue(image_keys)
        self.text.enqueue(text_keys)
        if groups is None:
            groups = torch.full((image_keys.shape[0],), NO_GROUP, dtype=torch.long, device=image_keys.device)
        self.groups.enqueue(groups)

    def valid_mask(self) -> torch.Tensor:
        return self.image.valid_mask()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Checkpoints written before the queue kept pair groups: their keys belong to no group.
        if prefix + "image.data" in state_dict and prefix + "groups.data" not in state_dict:
            state_dict[prefix + "groups.data"] = torch.full_like(self.groups.data, NO_GROUP)
            state_dict[prefix + "groups.ptr"] = state_dict[prefix + "image.ptr"].clone()
            state_dict[prefix + "groups.filled"] = state_dict[prefix + "image.filled"].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def fill_fraction(self) -> torch.Tensor:
        return self.image.filled.float() / self.size
