"""Benchmark 3: wall-clock and peak memory of a full CPU training step with SER vs without.

A small ViT (timm, 32 px, patch 4 -> 64 tokens, dim 192, depth 6) in the MoCo-v3-style step of
``bench_flops.py`` (projector/predictor 1024 hidden, momentum encoder, AdamW). With SER the ``b2`` share
of the batch is replaced by ``ser.views`` of those images (kornia MoCo-v3 photometrics + per-sample D4,
made inside the timed step) and ``ser.loss`` on layer 3 is added: the same number of encoder passes.

Time: all configurations (without, with b2 = 1/10/25/50 %) run in turn, round after round, on one
shared machine; the figure is the median over rounds (>= 5), as the ratio of medians and the median of
per-round ratios. Memory: (a) peak bytes of tensors alive during one step (:class:`LiveTensorBytes`,
after a warm-up step so optimizer state exists), plus the static bytes (parameters, momentum copy,
optimizer state) for the total; (b) as a cross-check, the peak-RSS delta of one step in a fresh process
per configuration (fixed glibc mmap threshold, so freed blocks leave RSS).

    PYTHONPATH=$PWD python benchmarks/bench_step.py                    # batch 128, 5 rounds
    PYTHONPATH=$PWD python benchmarks/bench_step.py --batch 256 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_flops import MODELS, MoCoV3Like  # noqa: E402
from common import (  # noqa: E402
    RSS_ENV,
    LiveTensorBytes,
    alternate_timing,
    md_table,
    median,
    ratio_of_medians_and_paired,
    rss_peak_delta,
    save,
    tensor_bytes,
)

from ser_plugin import attach_ser  # noqa: E402

VIT = dict(patch_size=4, embed_dim=192, depth=6, num_heads=3)


def build(args: argparse.Namespace, b2: float, seed: int = 0):
    """Model, optimizer and a step closure for one configuration (b2 = 0: without SER)."""
    torch.manual_seed(seed)
    if args.model == "vit":
        model = MoCoV3Like(args.img, "vit_tiny_patch16_224", hidden=1024, **VIT)
    else:  # a ResNet-50 / Swin-T (bench_flops.MODELS), SER at the layer given by --layer
        model = MoCoV3Like(args.img, MODELS[args.model][0], hidden=1024)
    ser = attach_ser(model.base, layer=args.layer, photometric="mocov3", max_negatives=args.max_negatives) if b2 > 0 else None
    params = [p for p in model.parameters() if p.requires_grad] + (list(ser.parameters()) if ser is not None else [])
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    x1 = torch.rand(args.batch, 3, args.img, args.img, generator=gen)
    x2 = torch.rand(args.batch, 3, args.img, args.img, generator=gen)
    n = max(2, round(b2 * args.batch)) if b2 > 0 else 0
    online = list(model.base.parameters()) + list(model.projector.parameters())
    momentum = list(model.m_base.parameters()) + list(model.m_projector.parameters())

    loader_pair = ser.views(x1[:n]) if ser is not None and args.views_in_loader else None

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        pair = None
        if ser is not None:
            pair = loader_pair if loader_pair is not None else ser.views(x1[:n])
        loss = model.step_loss(x1, x2, 1, ser, pair)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(momentum, 0.99)
            torch._foreach_add_(momentum, online, alpha=0.01)

    def static_bytes() -> int:
        state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        return tensor_bytes(list(model.parameters()) + state + (list(ser.parameters()) if ser else []))

    return step, static_bytes, n


def _iqr(xs: List[float]) -> str:
    q = sorted(xs)
    return f"{q[len(q) // 4]:.3f}-{q[(3 * len(q)) // 4]:.3f}"


def config_name(b2: float) -> str:
    return "without" if b2 == 0 else f"b2={b2:g}"


def child(args: argparse.Namespace) -> None:
    step, _, _ = build(args, args.child_b2)
    step()
    step()
    print(json.dumps({"rss_peak_delta": rss_peak_delta(step)}))


def rss_in_subprocess(b2: float, args: argparse.Namespace) -> int:
    env = {**os.environ, **RSS_ENV}
    cmd = [sys.executable, __file__, "--child-b2", str(b2), "--batch", str(args.batch), "--img", str(args.img),
           "--layer", str(args.layer), "--model", args.model] + (["--views-in-loader"] if args.views_in_loader else []) + (["--max-negatives", str(args.max_negatives)] if args.max_negatives else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_peak_delta"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--img", type=int, default=32)
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--shares", type=float, nargs="*", default=[0.01, 0.10, 0.25, 0.50])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-negatives", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--views-in-loader", action="store_true",
                   help="make SER's views outside the timed step, as the host's own views are (data-loader placement)")
    p.add_argument("--no-rss", action="store_true")
    p.add_argument("--model", default="vit", choices=["vit", "resnet50", "swin_tiny"],
                   help="the small ViT (default) or a ResNet-50 / Swin-T (use --layer 4 / 3 for the 14x14-at-224 layer)")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="", help="suffix of the result file name (perf_<name><tag>.json)")
    p.add_argument("--child-b2", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_b2 is not None:
        child(args)
        return
    configs = [0.0] + list(args.shares)
    built = {config_name(b2): build(args, b2) for b2 in configs}
    steps: Dict[str, Callable[[], None]] = {k: v[0] for k, v in built.items()}
    torch.set_num_threads(args.threads)
    cpu: Dict[str, List[float]] = {}
    times = alternate_timing(steps, args.repeats, warmup=1, cpu_times=cpu)
    rows: List[Dict] = []
    mem: Dict[str, Dict[str, float]] = {}
    for k, (step, static_bytes, _n) in built.items():
        with LiveTensorBytes() as m:
            step()
        mem[k] = {"step_peak": m.peak, "static": static_bytes()}
        if not args.no_rss:
            mem[k]["rss"] = rss_in_subprocess(0.0 if k == "without" else float(k.split("=")[1]), args)
    base = "without"
    for b2 in configs:
        k = config_name(b2)
        row: Dict = {"config": k, "b2_images": built[k][2], "median_step_s": median(times[k]),
                     "step_peak_MiB": mem[k]["step_peak"] / 2**20, "static_MiB": mem[k]["static"] / 2**20}
        if k != base:
            r = ratio_of_medians_and_paired(times, base, k)
            row["time_ratio"] = r["ratio_of_medians"]
            row["time_ratio_paired"] = r["median_paired_ratio"]
            row["cpu_time_ratio"] = ratio_of_medians_and_paired(cpu, base, k)["ratio_of_medians"]
            row["time_ratio_iqr"] = _iqr([y / x for x, y in zip(times[base], times[k])])
            row["step_peak_ratio"] = mem[k]["step_peak"] / mem[base]["step_peak"]
            row["total_peak_ratio"] = (mem[k]["step_peak"] + mem[k]["static"]) / (mem[base]["step_peak"] + mem[base]["static"])
            if "rss" in mem[k]:
                row["rss_ratio"] = mem[k]["rss"] / mem[base]["rss"]
        if "rss" in mem[k]:
            row["rss_delta_MiB"] = mem[k]["rss"] / 2**20
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["config", "b2_images", "median_step_s", "time_ratio", "time_ratio_paired", "time_ratio_iqr", "cpu_time_ratio", "step_peak_MiB", "static_MiB",
            "step_peak_ratio", "total_peak_ratio", "rss_delta_MiB", "rss_ratio"]
    md = (
        (f"## Full CPU training step with SER / without (ViT dim 192, depth 6, {args.img} px, patch 4, batch {args.batch}, layer {args.layer})\n\n"
         if args.model == "vit" else f"## Full CPU training step with SER / without ({MODELS[args.model][0]}, {args.img} px, batch {args.batch}, layer {args.layer})\n\n")
        + f"Configurations alternate round by round; {args.repeats} rounds; median; torch threads {args.threads}. time_ratio: ratio of "
        "median wall-clock; time_ratio_paired: median of per-round ratios (its inter-quartile range next to it); cpu_time_ratio: "
        "the same with process CPU time. step_peak: tensors alive during one step "
        "(activations, gradients, temporaries); total = step_peak + static (parameters, momentum copy, AdamW state); "
        "rss: peak-RSS delta of one step in a fresh process.\n\n" + md_table(rows, cols) + "\n"
    )
    save(("step" if args.max_negatives is None else f"step_budget{args.max_negatives}") + ("" if args.model == "vit" else f"_{args.model}") + args.tag, {"rows": rows, "times": times, "cpu_times": cpu, "args": vars(args)}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
