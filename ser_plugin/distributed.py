"""The two collectives of a gathered L_equiv step, and nothing that reads device values on the host.

One SER step under torch.distributed issues exactly:

1. :func:`exchange_sizes` — every rank's few shape integers (images, tokens per image per key segment),
   gathered as *CPU* tensors (through the default group when it handles CPU tensors, i.e. gloo or a
   ``"cpu:gloo,cuda:nccl"`` group, else through a gloo side group created once): the host learns every
   rank's sizes without waiting for the device;
2. :func:`gather_padded` — one all-gather of all the step's key rows, padded to the largest rank;
3. in backward, one reduce-scatter of the gathered rows' gradient on the same padded layout (each rank
   receives the sum over ranks for its own rows: ``(W-1)/W`` of the buffer on the wire instead of an
   all-reduce's ``2(W-1)/W``).

Without a side group for the sizes (gloo not built), :func:`exchange_sizes` falls back to the default group on
the device and one host read.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["is_distributed", "world_size", "rank", "exchange_sizes", "gather_padded", "gather_rows"]


def is_distributed() -> bool:
    """True when a default process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Ranks in the default group (1 without one)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in the default group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def _all_gather_single(out: Tensor, inp: Tensor, group: Any = None) -> None:
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def _reduce_scatter_single(out: Tensor, inp: Tensor) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(out, inp, op=dist.ReduceOp.SUM)


_HOST_GROUPS: Dict[int, Tuple[Any, Any]] = {}


def _host_group() -> Tuple[bool, Any]:
    """``(usable, group)`` for exchanging CPU tensors: the default group if its backend takes CPU tensors,
    else a gloo group over the same ranks, made on first use (every rank reaches the first gathered loss
    call in the same step, see docs/scale.md, "The contract")."""
    backend = str(dist.get_backend()).lower()
    if "gloo" in backend or "mpi" in backend:
        return True, None
    default = dist.distributed_c10d._get_default_group()
    known = _HOST_GROUPS.get(id(default))
    if known is None or known[0] is not default:  # first call, or a new default group since
        try:
            group: Any = dist.new_group(backend="gloo")
        except Exception:  # gloo not built: fall back to the device (one host read per step)
            group = False
        _HOST_GROUPS[id(default)] = (default, group)
    group = _HOST_GROUPS[id(default)][1]
    return group is not False, group


def exchange_sizes(sizes: Sequence[int], device: Optional[torch.device] = None) -> List[List[int]]:
    """Every rank's list of ``len(sizes)`` integers (one collective; same length on every rank).

    Args:
        sizes: this rank's integers (shapes, known on the host).
        device: the device of the step (used only by the fallback without a CPU-capable group).
    Returns:
        ``world_size()`` lists, rank order. Without a process group: ``[list(sizes)]``.
    """
    if not is_distributed():
        return [list(int(s) for s in sizes)]
    w = dist.get_world_size()
    usable, group = _host_group()
    mine = torch.tensor([int(s) for s in sizes], dtype=torch.int64)
    if not usable:
        mine = mine.to(device if device is not None else "cpu")
    out = mine.new_empty(w * mine.numel())
    _all_gather_single(out, mine, group=group)
    if usable:
        out._ser_host_tensor = True  # exchanged on the host: reading it waits for the other ranks, never for a device
    flat, k = out.tolist(), mine.numel()
    return [flat[i * k : (i + 1) * k] for i in range(w)]


class _GatherPadded(torch.autograd.Function):
    """``(rows, ...)`` on each rank -> ``(world, width, ...)``: every rank's rows, zero-padded to ``width``.
    Backward: one reduce-scatter on the padded layout; this rank keeps the sum of all ranks' gradients
    for its own rows."""

    @staticmethod
    def forward(ctx, x: Tensor, width: int) -> Tensor:  # type: ignore[override]
        w = dist.get_world_size()
        ctx.rows = x.shape[0]
        padded = x.new_zeros((width,) + tuple(x.shape[1:]))
        padded[: x.shape[0]] = x
        out = x.new_empty((w * width,) + tuple(x.shape[1:]))
        _all_gather_single(out, padded)
        return out.view((w, width) + tuple(x.shape[1:]))

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:  # type: ignore[override]
        w, width = grad.shape[:2]
        flat = grad.reshape((w * width,) + tuple(grad.shape[2:])).contiguous()
        mine = flat.new_empty((width,) + tuple(grad.shape[2:]))
        _reduce_scatter_single(mine, flat)
        return mine[: ctx.rows], None


def gather_padded(x: Tensor, width: int) -> Tensor:
    """All-gathers ``x`` (rows may differ per rank, ``<= width``) with gradient, in the padded layout.

    Args:
        x: ``(rows, ...)`` this rank's rows.
        width: the largest ``rows`` over ranks (from :func:`exchange_sizes`).
    Returns:
        ``(world_size(), width, ...)``; rank ``r``'s rows are ``out[r, :rows_r]``, the rest zeros. Without a
        process group: ``x`` padded to ``(1, width, ...)``.

    The gradient is exact: every rank's loss flows back into the rows each rank contributed, so under
    DDP's (or FSDP's) gradient averaging N ranks reproduce one process on the global batch.
    """
    if not is_distributed():
        if x.shape[0] == width:
            return x.unsqueeze(0)
        return torch.cat([x, x.new_zeros((width - x.shape[0],) + tuple(x.shape[1:]))]).unsqueeze(0)
    return _GatherPadded.apply(x, int(width))


def gather_rows(x: Tensor) -> Tuple[Tensor, List[int]]:
    """All-gathers ``x`` ``(n_r, ...)`` along dim 0 with gradient; returns the concatenation and the counts.

    Two collectives (sizes, rows) plus one reduce-scatter in backward. Without a process group it returns
    ``x`` itself.
    """
    if not is_distributed():
        return x, [x.shape[0]]
    counts = [c[0] for c in exchange_sizes([x.shape[0]], x.device)]
    buf = gather_padded(x, max(counts))
    return torch.cat([buf[r, :c] for r, c in enumerate(counts)]), counts
