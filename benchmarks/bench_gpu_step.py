"""One GPU, one command, <= 5 minutes: what SER costs in a MoCo-v3-style step at the paper's setting.

ViT-S/16 at 224 px, bf16 autocast, per-GPU batch 256, the MoCo-v3-style step of ``bench_flops.py``
(projector 4096-256, predictor, momentum encoder, AdamW, momentum update), SER at layer 3 with the b2
share of the batch replaced by ``ser.views`` of those images (matched view budget, views made inside the
step on the GPU). Configurations ``without``, ``b2=1%`` (3 images) and ``b2=10%`` (26 images) run in turn,
round after round (A, B, C, then C, B, A, ...), ``--steps`` steps per round timed with CUDA events;
figures are medians over rounds and ratios against ``without`` (ratio of medians and median of per-round
ratios). Memory: ``torch.cuda.max_memory_allocated`` over one step after ``reset_peak_memory_stats``, as
the step's transient peak (above what was allocated before the step) and the total including that
configuration's parameters, gradients, momentum copy and AdamW state. Host syncs: one extra step per
configuration under ``torch.cuda.set_sync_debug_mode("warn")`` (each warning is one synchronizing CUDA call,
counted from the CUDA side), next to ``benchmarks/sync_counter.py``'s count of the same step.

    python benchmarks/bench_gpu_step.py                # CUDA; writes benchmarks/results/perf_gpu_step.{json,md}
    python benchmarks/bench_gpu_step.py --smoke        # CPU, tiny ViT, seconds (what CI runs)

The result file carries the command, the machine (GPU, CUDA, torch) and the git commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from bench_flops import MoCoV3Like  # noqa: E402
from common import LiveTensorBytes, md_table, save, tensor_bytes  # noqa: E402
from sync_counter import count_syncs  # noqa: E402

from ser_plugin import attach_ser  # noqa: E402


def _args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny ViT (32 px, dim 48, depth 2), batch 8, 2 rounds")
    p.add_argument("--batch", type=int, default=None, help="per-GPU batch (default 256; smoke 8)")
    p.add_argument("--shares", type=float, nargs="*", default=[0.01, 0.10])
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 12; smoke 2)")
    p.add_argument("--steps", type=int, default=None, help="steps per configuration per round (default 5; smoke 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per configuration (default 3; smoke 1)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting new rounds after this many seconds")
    p.add_argument("--check-finite", choices=("default", "on", "off"), default="default",
                   help="SER's non-finite check (default: the library default)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.device = "cpu" if a.smoke else "cuda"
    a.batch = a.batch or (8 if a.smoke else 256)
    a.rounds = a.rounds or (2 if a.smoke else 12)
    a.steps = a.steps or (1 if a.smoke else 5)
    a.warmup = a.warmup or (1 if a.smoke else 3)
    a.img = 32 if a.smoke else 224
    if a.smoke:
        a.layer = min(a.layer, 2)  # the smoke ViT has 2 blocks
    return a


def config_name(b2: float) -> str:
    return "without" if b2 == 0 else f"b2={b2:.0%}"


def build(args: argparse.Namespace, b2: float) -> Dict[str, Any]:
    """Model, optimizer, fixed input batch and a step closure for one configuration (b2 = 0: without SER)."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    if args.smoke:
        model = MoCoV3Like(args.img, "vit_tiny_patch16_224", hidden=64, patch_size=4, embed_dim=48, depth=2, num_heads=3)
    else:
        model = MoCoV3Like(args.img, "vit_small_patch16_224", hidden=4096)
    model = model.to(dev)
    ser = None
    if b2 > 0:
        kw = {} if args.check_finite == "default" else {"check_finite": args.check_finite == "on"}
        ser = attach_ser(model.base, layer=args.layer, **kw).to(dev)
    params = [p for p in model.parameters() if p.requires_grad] + (list(ser.parameters()) if ser is not None else [])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    gen = torch.Generator(device=dev).manual_seed(1)
    x1 = torch.rand(args.batch, 3, args.img, args.img, generator=gen, device=dev)
    x2 = torch.rand(args.batch, 3, args.img, args.img, generator=gen, device=dev)
    n = max(2, round(b2 * args.batch)) if b2 > 0 else 0
    online = list(model.base.parameters()) + list(model.projector.parameters())
    momentum = list(model.m_base.parameters()) + list(model.m_projector.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        pair = ser.views(x1[:n]) if ser is not None else None  # augmentation: outside autocast, as in a loader
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = model.step_loss(x1, x2, 1, ser, pair)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(momentum, 0.99)
            torch._foreach_add_(momentum, online, alpha=0.01)

    def static_bytes() -> int:
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        grads = [p.grad for p in params if p.grad is not None]
        return tensor_bytes(list(model.parameters()) + state + grads + (list(ser.parameters()) if ser is not None else []))

    return {"step": step, "static_bytes": static_bytes, "b2_images": n, "ser": ser}


def _sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def time_steps(fn: Callable[[], None], steps: int, dev: str) -> float:
    """Seconds per step over ``steps`` consecutive steps (CUDA events on the GPU, wall clock on CPU)."""
    _sync(dev)
    if dev == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000.0 / steps
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps


def peak_memory(cfg: Dict[str, Any], dev: str) -> Dict[str, float]:
    """The step's transient peak (bytes above what was allocated before it) and the configuration's static bytes."""
    if dev == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        cfg["step"]()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with LiveTensorBytes() as m:
            cfg["step"]()
        peak = m.peak
    return {"step_peak": float(peak), "static": float(cfg["static_bytes"]())}


def count_host_syncs(cfg: Dict[str, Any], dev: str) -> Dict[str, Any]:
    """One step counted from the CUDA side (set_sync_debug_mode warnings) and by the dispatch counter."""
    out: Dict[str, Any] = {}
    if dev == "cuda":
        _sync(dev)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                cfg["step"]()
                # the step's own syncs only: stop counting before the benchmark synchronizes
                torch.cuda.set_sync_debug_mode("default")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        msgs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
        out["cuda_sync_warnings"] = len(msgs)
        out["cuda_sync_where"] = sorted(set(m.split("\n")[0][:160] for m in msgs))[:10]
        _sync(dev)
    else:
        out["cuda_sync_warnings"] = None  # set_sync_debug_mode exists only for CUDA
    with count_syncs() as c:
        cfg["step"]()
    _sync(dev)
    out["counter_syncs"] = c.total
    out["counter_by_op"] = dict(c.by_op)
    out["counter_where"] = c.report()
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = _args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU smoke mode")
    if dev == "cuda":
        torch.backends.cudnn.benchmark = False
    t_start = time.perf_counter()
    configs = [0.0] + list(args.shares)
    built = {config_name(b2): build(args, b2) for b2 in configs}
    for _ in range(args.warmup):
        for cfg in built.values():
            cfg["step"]()
    _sync(dev)
    times: Dict[str, List[float]] = {k: [] for k in built}
    rounds_done = 0
    for r in range(args.rounds):
        if r >= 2 and time.perf_counter() - t_start > args.budget_s:
            break
        order = list(built) if r % 2 == 0 else list(built)[::-1]
        for k in order:
            times[k].append(time_steps(built[k]["step"], args.steps, dev))
        rounds_done += 1
    mem = {k: peak_memory(cfg, dev) for k, cfg in built.items()}
    syncs = {k: count_host_syncs(cfg, dev) for k, cfg in built.items()}
    base = "without"
    rows = []
    for k in built:
        med = statistics.median(times[k])
        row: Dict[str, Any] = {
            "config": k, "b2_images": built[k]["b2_images"], "median_step_ms": 1000 * med,
            "step_peak_MiB": mem[k]["step_peak"] / 2**20, "total_peak_MiB": (mem[k]["step_peak"] + mem[k]["static"]) / 2**20,
            "cuda_sync_warnings": syncs[k]["cuda_sync_warnings"], "counter_syncs": syncs[k]["counter_syncs"],
        }
        if k != base:
            row["ser_added_counter_syncs"] = syncs[k]["counter_syncs"] - syncs[base]["counter_syncs"]
            if syncs[k]["cuda_sync_warnings"] is not None:
                row["ser_added_cuda_syncs"] = syncs[k]["cuda_sync_warnings"] - syncs[base]["cuda_sync_warnings"]
            row["time_ratio"] = med / statistics.median(times[base])
            row["time_ratio_paired"] = statistics.median([y / x for x, y in zip(times[base], times[k])])
            row["step_peak_ratio"] = mem[k]["step_peak"] / mem[base]["step_peak"]
            row["total_peak_ratio"] = (mem[k]["step_peak"] + mem[k]["static"]) / (mem[base]["step_peak"] + mem[base]["static"])
        rows.append(row)
    wall = time.perf_counter() - t_start
    setting = (f"{'tiny ViT (dim 48, depth 2), 32 px, CPU smoke mode' if args.smoke else 'ViT-S/16, 224 px'}, bf16 autocast, "
               f"batch {args.batch}, layer {args.layer}, {rounds_done} rounds x {args.steps} steps, warm-up {args.warmup}")
    cols = ["config", "b2_images", "median_step_ms", "time_ratio", "time_ratio_paired", "step_peak_MiB", "step_peak_ratio",
            "total_peak_MiB", "total_peak_ratio", "cuda_sync_warnings", "ser_added_cuda_syncs", "counter_syncs", "ser_added_counter_syncs"]
    md = (f"## One MoCo-v3-style step with SER / without on {torch.cuda.get_device_name(0) if dev == 'cuda' else 'CPU'}\n\n"
          f"{setting}; wall time of the whole run {wall:.0f} s.\n\n" + md_table(rows, cols) + "\n\nSync sites (counter):\n\n"
          + "\n".join(f"* {k}: " + syncs[k]["counter_where"].replace("\n", "; ") for k in built) + "\n")
    if dev == "cuda":
        md += "\nCUDA-side sync warnings (first lines):\n\n" + "\n".join(f"* {k}: {syncs[k]['cuda_sync_where']}" for k in built) + "\n"
    data = {"rows": rows, "times_s": times, "rounds": rounds_done, "wall_s": wall, "syncs": syncs, "setting": setting,
            "args": {k: v for k, v in vars(args).items()},
            "cuda": {"version": torch.version.cuda, "device": torch.cuda.get_device_name(0)} if dev == "cuda" else None}
    save("gpu_step" + ("_smoke" if args.smoke else ""), data, md, args.out)
    print(md)
    print(json.dumps(rows))
    return data


if __name__ == "__main__":
    main()
