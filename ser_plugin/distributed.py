"""Autograd-aware all-gather of rows whose count may differ per rank."""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "gather_rows"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


class _GatherRows(torch.autograd.Function):
    """Concatenates every rank's ``(n_r, C)`` rows; backward sums the gradients of all ranks' losses
    for this rank's rows (all-reduce) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: List[int]) -> Tensor:  # type: ignore[override]
        ctx.counts = counts
        ctx.rank = dist.get_rank()
        width = max(counts)
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:c] for p, c in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.counts[: ctx.rank])
        return grad[start : start + ctx.counts[ctx.rank]], None


def gather_rows(x: Tensor) -> Tuple[Tensor, List[int]]:
    """All-gathers ``x`` (n_r, ...) along dim 0 with gradient; returns the concatenation and the per-rank counts.

    Without an initialised process group (or with one rank) it returns ``x`` itself.
    The gradient is exact: the loss of every rank flows back into the rows each rank contributed, so
    under DDP's gradient averaging N ranks reproduce one process on the global batch.
    """
    if not is_distributed():
        return x, [x.shape[0]]
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    all_n = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(all_n, n)
    counts = [int(c.item()) for c in all_n]
    return _GatherRows.apply(x, counts), counts
