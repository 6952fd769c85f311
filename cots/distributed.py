"""The one module that talks to ``torch.distributed``.

With a single process (or no process group) every collective is the identity,
so losses, queues and tests run without any setup.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every rank along dim 0, in rank order: (W*B, ...).

    All ranks must pass the same shape. The result carries no gradient.
    """
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over ranks (a new tensor; ``x`` is untouched)."""
    if not is_distributed():
        return x.detach().clone()
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_gather_object(obj) -> list:
    """``obj`` from every rank, in rank order (a list of one with a single process); picklable objects only."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def share(total: int, rank_: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(start, stop) of this rank's contiguous share of ``total`` items: shares in rank order cover
    0..total once, and their sizes differ by at most one (the first ``total % world`` ranks get one more)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(total, world)
    start = rank_ * base + min(rank_, extra)
    return start, start + base + (1 if rank_ < extra else 0)


@torch.no_grad()
def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B_r, ...) from every rank along dim 0, in rank order, when B_r differs by rank.

    Trailing dimensions and dtype must agree. Each rank's part is padded to the longest for the collective
    and the padding is cut off again, so nothing appears twice. The result carries no gradient.
    """
    if not is_distributed():
        return x.detach()
    lengths = all_gather_no_grad(torch.tensor([x.shape[0]], device=x.device)).tolist()
    longest = max(lengths)
    padded = x.detach().new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x.detach()
    parts = all_gather_no_grad(padded).split(longest)
    return torch.cat([part[:n] for part, n in zip(parts, lengths, strict=True)])
