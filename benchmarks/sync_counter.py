"""Count host syncs and torch.distributed collectives in a block of code (CPU or GPU).

A *host sync* is any operation that makes the host wait for a device value: ``.item()``, ``bool(t)``,
``int(t)``, ``float(t)``, ``.tolist()``, ``.numpy()``, and the ops whose *output shape* depends on tensor
values (``nonzero``, ``unique``, ``masked_select``, boolean-mask indexing, ``repeat_interleave`` with a
repeats tensor and no ``output_size``, ...). On a GPU each one stalls the stream; on a CPU they cost
nothing, which is why they are counted here rather than timed: the counts are the same on both
devices, so a CPU test can guard a GPU property.

Usage (the API is stable; other branches copy this file)::

    from benchmarks.sync_counter import count_syncs, count_collectives

    with count_syncs() as c:
        loss = criterion(f1, f2, g)
        loss.backward()
    assert c.total == 0, c.report()
    c.by_op            # {"aten._local_scalar_dense": 2, "Tensor.tolist": 1, ...}
    c.events           # [(name, detail), ...] in call order (detail: shapes, or the caller's line)

    with count_collectives() as c:   # under torch.distributed
        ...
    c.total, c.by_op, c.elements     # calls, calls per collective, elements sent per collective

How it counts:

* A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every aten op (forward, backward,
  custom autograd functions) and counts those in :data:`SYNC_OPS`, plus value-dependent variants
  (:func:`_is_sync`): ``aten.index.Tensor`` / ``index_put_`` with a boolean index, ``repeat_interleave``
  with a tensor of repeats and no ``output_size``, copies from a non-CPU device to the CPU that are not
  ``non_blocking``.
* ``Tensor.tolist``, ``Tensor.numpy``, ``Tensor.__array__`` and ``Tensor.__bool__`` are wrapped for the
  duration of the block (``tolist``/``numpy`` do not dispatch any aten op on CPU tensors); an op reached
  from inside a wrapped method is not counted twice. Not counted: reading a tensor tagged
  ``_ser_host_tensor = True``. ser_plugin tags the tensors that live on the host by design in a GPU run too:
  the host copy of a non-blocking device->host transfer, read only after a CUDA event says it is complete
  (``ser_plugin.loss.FiniteCheck``), and the shape integers exchanged through a CPU (gloo) process group
  (``ser_plugin.distributed.exchange_sizes``). Reading them never stalls a device; on a CPU-only run they
  are CPU tensors like all others, which would otherwise be counted.
* Collectives: the Python entry points of ``torch.distributed`` (:data:`COLLECTIVES`) are wrapped for the
  duration of the block (a collective calling another, e.g. ``all_gather_object`` -> ``all_gather``,
  counts once), plus functional collectives (``_c10d_functional`` ops) seen by a dispatch mode.
  Not counted: DDP's / FSDP's own gradient buckets, which its C++ reducer sends (they are the host's).

Limitations: ops run inside ``torch.compile``d graphs are not seen; a sync made by C++ code without a
dispatched op (e.g. inside a kernel launch) is not seen — on a GPU, cross-check with
``torch.cuda.set_sync_debug_mode("warn")`` (``benchmarks/bench_gpu_step.py`` does).
"""

from __future__ import annotations

import contextlib
import functools
import threading
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SYNC_OPS", "COLLECTIVES", "Counts", "count_syncs", "count_collectives"]

_aten = torch.ops.aten

#: aten overload packets that always read device values back to the host
SYNC_OPS = {
    _aten._local_scalar_dense,  # .item(), bool(t), int(t), float(t), f"{t:.3f}", range(t), ...
    _aten.is_nonzero,
    _aten.equal,
    _aten.allclose,
    _aten.nonzero,
    _aten.argwhere,
    _aten.masked_select,
    _aten.unique_dim,
    _aten.unique_consecutive,
    _aten.unique_dim_consecutive,
    _aten._unique,
    _aten._unique2,
    _aten.bincount,
    _aten.histc,
    _aten.tensor_split.tensor_indices_or_sections,
    _aten.narrow.Tensor,
    _aten.nonzero_numpy,
}

#: torch.distributed entry points counted by :func:`count_collectives`
COLLECTIVES = (
    "all_gather", "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather_coalesced", "all_gather_object",
    "all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base",
    "broadcast", "broadcast_object_list", "_broadcast_coalesced", "all_to_all", "all_to_all_single",
    "gather", "gather_object", "scatter", "scatter_object_list", "barrier", "monitored_barrier",
)

_SYNC_PACKETS = {op for op in SYNC_OPS if isinstance(op, torch._ops.OpOverloadPacket)}
_SYNC_OVERLOADS = {op for op in SYNC_OPS if isinstance(op, torch._ops.OpOverload)}

_local = threading.local()
_THIS = __file__.replace("\\", "/")


def _depth() -> int:
    return getattr(_local, "depth", 0)


@contextlib.contextmanager
def _inside_wrapper() -> Iterator[None]:
    _local.depth = _depth() + 1
    try:
        yield
    finally:
        _local.depth -= 1


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", func)
    ns = getattr(packet, "__module__", "").replace("torch._ops.", "") or "aten"
    return f"{ns}.{getattr(packet, '__name__', str(packet))}"


def _caller(skip: int = 1) -> str:
    """``file:line`` of the first frame outside this module and torch (where the sync was written)."""
    for fr in reversed(traceback.extract_stack()[:-skip]):
        f = fr.filename.replace("\\", "/")
        if "/torch/" not in f and f != _THIS and not f.endswith("/contextlib.py"):
            return f"{f.rsplit('/', 1)[-1]}:{fr.lineno} ({fr.name})"
    return "?"


@dataclass
class Counts:
    """What a counting block saw.

    Attributes:
        total: number of counted events.
        by_op: events per op / method / collective name.
        events: ``(name, detail)`` in call order; ``detail`` names the calling line when ``where=True``.
        elements: (collectives only) elements sent per collective name.
    """

    total: int = 0
    by_op: Dict[str, int] = field(default_factory=dict)
    events: List[Tuple[str, str]] = field(default_factory=list)
    elements: Dict[str, int] = field(default_factory=dict)

    def add(self, name: str, detail: str = "", elements: int = 0) -> None:
        self.total += 1
        self.by_op[name] = self.by_op.get(name, 0) + 1
        self.events.append((name, detail))
        if elements:
            self.elements[name] = self.elements.get(name, 0) + int(elements)

    def reset(self) -> None:
        self.total = 0
        self.by_op.clear()
        self.events.clear()
        self.elements.clear()

    def report(self) -> str:
        """One line per event kind, with where each was called from (for assertion messages)."""
        if not self.total:
            return "none"
        where: Dict[str, Counter] = {}
        for name, detail in self.events:
            where.setdefault(name, Counter())[detail] += 1
        lines = [f"{self.total} in all"]
        for name, n in sorted(self.by_op.items(), key=lambda kv: -kv[1]):
            at = ", ".join(f"{d or '?'} x{c}" for d, c in where[name].most_common(4))
            lines.append(f"  {name}: {n}  [{at}]")
        return "\n".join(lines)


def _is_bool_index(idx: Any) -> bool:
    return isinstance(idx, torch.Tensor) and idx.dtype in (torch.bool, torch.uint8)


def _is_sync(func: Any, args: tuple, kwargs: dict) -> bool:
    if func in _SYNC_OVERLOADS or getattr(func, "overloadpacket", None) in _SYNC_PACKETS:
        return True
    packet = getattr(func, "overloadpacket", None)
    if packet in (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(_is_bool_index(i) for i in (indices or ()))
    if packet is _aten.repeat_interleave:
        repeats = args[1] if len(args) > 1 and func is not _aten.repeat_interleave.Tensor else args[0]
        if func is _aten.repeat_interleave.Tensor:
            return kwargs.get("output_size") is None
        return isinstance(repeats, torch.Tensor) and repeats.numel() > 1 and kwargs.get("output_size") is None
    if packet is _aten._to_copy:
        src, dev = args[0], kwargs.get("device")
        return (isinstance(src, torch.Tensor) and src.device.type not in ("cpu", "meta") and dev is not None
                and torch.device(dev).type == "cpu" and not kwargs.get("non_blocking", False))
    if packet is _aten.copy_:
        dst, src = args[0], args[1]
        nb = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        return (isinstance(src, torch.Tensor) and dst.device.type == "cpu"
                and src.device.type not in ("cpu", "meta") and not nb)
    return False


class _SyncMode(TorchDispatchMode):
    def __init__(self, counts: Counts, where: bool) -> None:
        super().__init__()
        self.counts, self.where = counts, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if _depth() == 0 and _is_sync(func, args, kwargs):
            self.counts.add(_op_name(func), _caller() if self.where else "")
        return func(*args, **kwargs)


# ---------------------------------------------------------------- Python-level wrappers (shared by nested blocks)
_TENSOR_METHODS = ("tolist", "numpy", "__array__", "__bool__")
_active_syncs: List[Tuple[Counts, bool]] = []
_active_colls: List[Tuple[Counts, bool]] = []
_saved: Dict[Tuple[Any, str], Callable] = {}
_lock = threading.Lock()


def _wrap_method(owner: Any, name: str, on_call: Callable[[str, tuple, dict], None]) -> None:
    original = getattr(owner, name)
    _saved[(owner, name)] = original

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _depth() == 0:
            on_call(name, args, kwargs)
        with _inside_wrapper():
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _restore(owner: Any, names: Tuple[str, ...]) -> None:
    for name in names:
        original = _saved.pop((owner, name), None)
        if original is not None:
            setattr(owner, name, original)


def _on_tensor_method(name: str, args: tuple, kwargs: dict) -> None:
    if args and getattr(args[0], "_ser_host_tensor", False):
        return  # a completed non-blocking device->host copy (see the module docstring)
    for counts, where in list(_active_syncs):
        counts.add(f"Tensor.{name}", _caller() if where else "")


def _numel(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel()
    if isinstance(x, (list, tuple)):
        return sum(_numel(v) for v in x)
    return 0


def _on_collective(name: str, args: tuple, kwargs: dict) -> None:
    # elements *sent* by this rank: the input tensor(s) (for all_gather the 2nd argument, else the 1st)
    two_args = ("all_gather", "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter",
                "reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base", "all_to_all_single")
    sent_arg = args[1] if name in two_args and len(args) > 1 else (args[0] if args else None)
    if name in ("all_to_all",) and len(args) > 1:
        sent_arg = args[1]
    for counts, where in list(_active_colls):
        counts.add(name, _caller() if where else "", _numel(sent_arg))


@contextlib.contextmanager
def count_syncs(where: bool = True) -> Iterator[Counts]:
    """Counts host syncs made inside the block (also in backward, custom autograd functions, nested blocks).

    Args:
        where: record the calling ``file:line`` of each event (for ``Counts.report()``; a bit slower).
    Returns:
        (yields) a :class:`Counts` filled as the block runs.
    """
    counts = Counts()
    with _lock:
        if not _active_syncs:
            for name in _TENSOR_METHODS:
                _wrap_method(torch.Tensor, name, _on_tensor_method)
        _active_syncs.append((counts, where))
    try:
        with _SyncMode(counts, where):
            yield counts
    finally:
        with _lock:
            _active_syncs.remove((counts, where))
            if not _active_syncs:
                _restore(torch.Tensor, _TENSOR_METHODS)


class _FunctionalCollectiveMode(TorchDispatchMode):
    def __init__(self, counts: Counts, where: bool) -> None:
        super().__init__()
        self.counts, self.where = counts, where

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        ns = getattr(getattr(func, "overloadpacket", func), "__module__", "")
        name = getattr(getattr(func, "overloadpacket", func), "__name__", "")
        if _depth() == 0 and ns.endswith("_c10d_functional") and name != "wait_tensor":
            self.counts.add(f"_c10d_functional.{name}", _caller() if self.where else "", _numel(args[0] if args else None))
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_collectives(where: bool = True) -> Iterator[Counts]:
    """Counts torch.distributed collectives issued inside the block (Python entry points and functional
    collectives); ``Counts.elements`` holds the elements this rank sent per collective.

    Args:
        where: record the calling ``file:line`` of each event.
    Returns:
        (yields) a :class:`Counts` filled as the block runs.
    """
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    counts = Counts()
    owners = [m for m in (dist, c10d)]
    with _lock:
        if not _active_colls:
            for owner in owners:
                for name in COLLECTIVES:
                    if hasattr(owner, name) and (owner, name) not in _saved:
                        _wrap_method(owner, name, _on_collective)
        _active_colls.append((counts, where))
    try:
        with _FunctionalCollectiveMode(counts, where):
            yield counts
    finally:
        with _lock:
            _active_colls.remove((counts, where))
            if not _active_colls:
                for owner in owners:
                    _restore(owner, COLLECTIVES)


def format_counts(counts: Dict[str, Counts], kind: str = "syncs") -> str:
    """A markdown table ``phase | count | by op`` for a dict of per-phase counts."""
    lines = [f"| phase | {kind} | by op |", "|---|---|---|"]
    for phase, c in counts.items():
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(c.by_op.items())) or "-"
        lines.append(f"| {phase} | {c.total} | {ops} |")
    return "\n".join(lines)


def _self_test(argv: Optional[List[str]] = None) -> None:  # pragma: no cover - manual check
    x = torch.randn(8)
    with count_syncs() as c:
        x.sum().item()
        x.tolist()
        x[x > 0]
        torch.unique(x)
        bool(x.sum() > 0)
    print(c.report())


if __name__ == "__main__":  # pragma: no cover
    _self_test()
