"""Shared helpers for the performance benchmarks: machine facts, result files, FLOPs and memory counters.

Every benchmark prints ratios measured side by side in one run and writes
``benchmarks/results/perf_<name>.json`` and ``.md`` with the command and the machine next to the figures.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten


def command_line() -> str:
    """The command that produced a result, as typed from the repository root."""
    script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
    return "PYTHONPATH=$PWD python " + " ".join(shlex.quote(a) for a in [script] + sys.argv[1:])


def _git_commit() -> Optional[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "ser_plugin"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty ser_plugin" if dirty.stdout.strip() else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> Dict[str, Any]:
    """What the figures ran on (CPU model, cores, torch, load), for the result files."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores_visible": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_when_written": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "gpu": "none (CPU only)" if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_commit": _git_commit(),
        "note": "shared machine (several agents on 2 cores): wall-clock ratios alternate configurations and use medians",
    }


def save(name: str, data: Dict[str, Any], markdown: str, out_dir: Optional[Path] = None) -> Path:
    """Writes ``perf_<name>.json`` and ``perf_<name>.md`` (with command and machine) and returns the JSON path."""
    out = Path(out_dir) if out_dir is not None else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": command_line(), "machine": machine(), **data}
    path = out / f"perf_{name}.json"
    path.write_text(json.dumps(data, indent=1, default=float) + "\n")
    m = data["machine"]
    head = (
        f"Command: `{data['command']}`\n\n"
        f"Machine: {m['cpu']}, {m['cores_visible']} cores visible, torch {m['torch']}, {m['gpu']}, "
        f"load avg {m['loadavg_when_written']}, {m['date_utc']}, commit {m['git_commit']}. {m['note']}.\n\n"
    )
    (out / f"perf_{name}.md").write_text(head + markdown.rstrip() + "\n")
    return path


sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples" / "demo"))
from ser_demo.report import md_table  # noqa: E402,F401  (the one markdown-table helper of the repo)


# ---------------------------------------------------------------------------------------------- FLOPs
def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    m, k = a_shape
    return 2 * m * k * b_shape[1]


#: formulas FlopCounterMode lacks. CPU's fused attention otherwise counts 0 (the meta device decomposes
#: attention into bmm, which is counted anyway; the CPU backward formula includes flash attention's
#: recomputation of the scores). The in-place ``addmm_`` (used by L_equiv's backward to accumulate the key
#: gradient) is not in torch's table either and would silently count 0.
EXTRA_FORMULAS: Dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
    aten.addmm_: _addmm_inplace,
}


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts CPU scaled_dot_product_attention (forward, backward) and ``addmm_``."""
    return FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS)


# ---------------------------------------------------------------------------------------------- memory
class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages (CPU or meta) created while the mode is active and still alive.

    Every op's outputs pass through ``__torch_dispatch__`` (also the ops autograd runs in backward and those
    inside custom autograd functions); a new storage is counted until Python's finaliser on it runs, which is
    when its last tensor (view, saved-for-backward reference, gradient) dies. Storages that existed before
    (parameters, inputs, optimizer state from earlier steps) are not counted, so ``peak`` is the step's
    transient peak: activations kept for backward, gradients and temporaries. Unlike process RSS it does not
    depend on the allocator's caching, and unlike tracemalloc it sees torch's allocations. On the ``meta``
    device it gives the same figure without computing anything. It misses scratch memory that a kernel
    allocates internally without dispatching an op; :func:`rss_peak_delta` (process RSS) includes that.
    """

    def __init__(self, devices: Sequence[str] = ("cpu", "meta")) -> None:
        super().__init__()
        self.devices = tuple(devices)
        self.current = 0
        self.peak = 0
        self._live: Dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and not t.is_sparse}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type in self.devices and not t.is_sparse:
                st = t.untyped_storage()
                key = st._cdata  # the StorageImpl's address: also distinct for meta storages (data_ptr 0)
                nbytes = st.nbytes()
                if nbytes == 0 or key in self._live or key in inputs:  # views and in-place results are not new
                    continue
                self._live[key] = nbytes
                self.current += nbytes
                self.peak = max(self.peak, self.current)
                weakref.finalize(st, self._free, key)
        return out


def peak_bytes(fn: Callable[[], Any]) -> int:
    """Transient peak of tensor bytes while ``fn`` runs (see :class:`LiveTensorBytes`)."""
    with LiveTensorBytes() as m:
        res = fn()
        del res
    return m.peak


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            total += st.nbytes()
    return total


# ---------------------------------------------------------------------------------------------- timing
def alternate_timing(fns: Dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     cpu_times: Optional[Dict[str, List[float]]] = None) -> Dict[str, List[float]]:
    """Runs the configurations in turn (A, B, C, then C, B, A, ...) and returns each one's wall-clock times.

    Alternating spreads the shared machine's load changes over all configurations; report medians. If
    ``cpu_times`` is given it receives the process CPU time of each run too (less sensitive to being
    descheduled by other jobs on a shared machine, still sensitive to cache and memory contention).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for k in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
            if cpu_times is not None:
                cpu_times.setdefault(k, []).append(time.process_time() - c0)
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def ratio_of_medians_and_paired(times: Dict[str, List[float]], base: str, other: str) -> Dict[str, float]:
    """Median ratio two ways: ratio of medians, and median of per-round ratios (pairs ran back to back)."""
    a, b = times[base], times[other]
    return {
        "ratio_of_medians": median(b) / median(a),
        "median_paired_ratio": median([y / x for x, y in zip(a, b)]),
    }


# ---------------------------------------------------------------------------------------------- RSS
def reset_rss_peak() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


#: glibc settings for RSS measurements: a fixed mmap threshold (glibc otherwise raises it after the first
#: large free, and freed blocks then stay resident), so every large tensor is its own mapping, unmapped when freed
RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def rss_peak_delta(fn: Callable[[], Any]) -> int:
    """Peak resident memory while ``fn`` runs minus the resident memory before it, in bytes (Linux).

    Counts everything the process touches (also kernels' scratch memory), but depends on the allocator:
    run it in a fresh process per configuration with :data:`RSS_ENV` (not with the huge
    ``MALLOC_MMAP_THRESHOLD_`` used to speed up training).
    """
    if not reset_rss_peak():
        raise RuntimeError("cannot reset the peak-RSS mark (/proc/self/clear_refs)")
    before = _status_kib("VmRSS")
    res = fn()
    del res
    return (_status_kib("VmHWM") - before) * 1024


# ---------------------------------------------------------------------------------------------- meta device
def meta_safe_rho(real_rho: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Wraps :func:`ser_plugin.group.rho` so it also runs on ``meta`` tensors (D4 elements, no scale).

    ``rho`` reads the elements' values to pick the permutation (``bool(...)`` on tensors), which the meta
    device cannot do. On meta maps this computes the same gather index on the CPU from the (CPU) elements
    and runs the same one ``gather`` on the meta map: identical shapes, and a gather counts 0 FLOPs anyway.
    """
    from ser_plugin.group import _d4_index

    def rho(tokens: torch.Tensor, g: Any, size: Any = None, mode: str = "bilinear") -> torch.Tensor:
        if tokens.device.type != "meta":
            return real_rho(tokens, g, size=size, mode=mode)
        b, c, h, w = tokens.shape
        if g.has_scale():
            raise NotImplementedError("meta_safe_rho handles D4 elements only")
        idx, ho, wo = _d4_index(h, w, g.rot.cpu(), g.flip.cpu())
        idx = idx.to("meta")
        return tokens.reshape(b, c, h * w).gather(2, idx[:, None, :].expand(b, c, ho * wo)).reshape(b, c, ho, wo)

    return rho


def patch_rho_for_meta() -> None:
    """Makes ``ser_plugin``'s loss use :func:`meta_safe_rho` (idempotent)."""
    import ser_plugin.loss as loss_mod

    if not getattr(loss_mod.rho, "_meta_safe", False):
        wrapped = meta_safe_rho(loss_mod.rho)
        wrapped._meta_safe = True  # type: ignore[attr-defined]
        loss_mod.rho = wrapped
