"""Benchmark 4: L_equiv (chunked, linear memory) against the reference code's approach (full matrix).

The reference approach, as described for the authors' code (written here from that description, not
copied): build the full ``(N, N)`` similarity matrix of the ``N = n·h·w`` tokens, exponentiate it by hand,
and pick positives and negatives with dense ``(N, N)`` float masks, ``-log(pos / (pos + neg))``. Both
versions compute the same symmetric token InfoNCE (checked on the first size) on the same inputs.

Reported per size: forward+backward time (alternating the two versions, median of repeats), the peak
tensor bytes of forward+backward (:class:`common.LiveTensorBytes`), and for the CPU sizes the peak RSS
delta measured in a fresh subprocess per (version, size). Sizes whose naive matrix would not fit in the
memory limit are marked as not run; sizes beyond ``--time-max`` tokens are measured for memory only, on
the ``meta`` device (same tensors, no compute).

    PYTHONPATH=$PWD python benchmarks/bench_loss.py                 # 1k..4k timed, up to 100k memory
    PYTHONPATH=$PWD python benchmarks/bench_loss.py --full          # 1k..20k timed (slow on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RSS_ENV, LiveTensorBytes, alternate_timing, md_table, median, patch_rho_for_meta, rss_peak_delta, save  # noqa: E402

import ser_plugin.loss as loss_mod  # noqa: E402
from ser_plugin.group import GroupElement  # noqa: E402
from ser_plugin.loss import TokenInfoNCE  # noqa: E402

GRID = 14  # tokens per side (ViT-S/16 at 224)


def naive_equiv_loss(f1: torch.Tensor, f2: torch.Tensor, g: GroupElement, tau: float) -> torch.Tensor:
    """The full-matrix approach: (N, N) similarities, hand-written exp/log, dense float masks."""
    z1 = loss_mod.rho(f1, g, size=tuple(f2.shape[-2:]))  # the package's rho (meta-safe when patched)
    n, c, h, w = f2.shape
    q = F.normalize(rearrange(f2, "n c h w -> (n h w) c"), dim=-1)
    k = F.normalize(rearrange(z1, "n c h w -> (n h w) c"), dim=-1)
    ids = torch.arange(n, device=f2.device).repeat_interleave(h * w)
    pos_mask = torch.eye(ids.numel(), device=f2.device)
    neg_mask = (ids[:, None] != ids[None, :]).float()

    def one_direction(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        e = torch.exp(a @ b.t() / tau)
        pos = (e * pos_mask).sum(1)
        neg = (e * neg_mask).sum(1)
        return -torch.log(pos / (pos + neg)).mean()

    return 0.5 * (one_direction(q, k) + one_direction(k, q))


def make_inputs(tokens: int, channels: int, device: str = "cpu", seed: int = 0):
    n = max(2, round(tokens / (GRID * GRID)))
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, channels, GRID, GRID, generator=gen).to(device).requires_grad_(True)
    f2 = torch.randn(n, channels, GRID, GRID, generator=gen).to(device).requires_grad_(True)
    g = GroupElement.random(n, generator=gen)
    return f1, f2, g


def run_once(version: str, f1, f2, g, tau: float) -> float:
    f1.grad = f2.grad = None
    if version == "ours":
        loss = TokenInfoNCE(tau)(f1, f2, g)
    else:
        loss = naive_equiv_loss(f1, f2, g, tau)
    loss.backward()
    return float(loss.detach().float().sum()) if loss.device.type != "meta" else 0.0


def naive_bytes_estimate(tokens: int) -> int:
    # sim, exp, two masks, two masked products per direction (the autograd graph keeps most of them)
    return 8 * tokens * tokens * 4


def child(args: argparse.Namespace) -> None:
    """Fresh-process RSS measurement of one (version, size): prints a JSON line."""
    torch.manual_seed(0)
    f1, f2, g = make_inputs(args.child_tokens, args.channels)
    run_once(args.child_version, f1, f2, g, args.tau)  # first call: one-time allocations (thread pools, kernels)
    delta = rss_peak_delta(lambda: run_once(args.child_version, f1, f2, g, args.tau))
    print(json.dumps({"rss_peak_delta": delta}))


def rss_in_subprocess(version: str, tokens: int, args: argparse.Namespace) -> int:
    env = {**os.environ, **RSS_ENV}  # fixed mmap threshold: large blocks are unmapped when freed, so RSS follows live memory
    cmd = [sys.executable, __file__, "--child-version", version, "--child-tokens", str(tokens),
           "--channels", str(args.channels), "--tau", str(args.tau)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["rss_peak_delta"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--full", action="store_true", help="time up to 20k tokens (slow)")
    p.add_argument("--tokens", type=int, nargs="*", default=None, help="token counts n*h*w")
    p.add_argument("--time-max", type=int, default=None, help="largest size timed on CPU (larger: memory on meta)")
    p.add_argument("--channels", type=int, default=384)
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-limit-gb", type=float, default=6.0, help="skip the naive version above this estimate")
    p.add_argument("--no-rss", action="store_true", help="skip the subprocess RSS measurements")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="", help="suffix of the result file name (perf_<name><tag>.json)")
    p.add_argument("--child-version", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-tokens", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    patch_rho_for_meta()
    torch.set_num_threads(args.threads)
    if args.child_version:
        child(args)
        return
    tokens = args.tokens or [1000, 2000, 5000, 10000, 20000, 50000, 100000]
    time_max = args.time_max if args.time_max is not None else (20000 if args.full else 4000)
    rows: List[Dict] = []
    checked = False
    for tk in tokens:
        f1, f2, g = make_inputs(tk, args.channels)
        actual = f1.shape[0] * GRID * GRID
        naive_fits = naive_bytes_estimate(actual) <= args.naive_limit_gb * 2**30
        row: Dict = {"tokens": actual, "images": f1.shape[0], "channels": args.channels}
        versions = ["ours"] + (["naive"] if naive_fits else [])
        if not checked and naive_fits:
            a = run_once("ours", f1, f2, g, args.tau)
            ga = (f1.grad.clone(), f2.grad.clone())
            b = run_once("naive", f1, f2, g, args.tau)
            row["check_loss_abs_diff"] = abs(a - b)
            row["check_grad_max_abs_diff"] = max(float((ga[0] - f1.grad).abs().max()), float((ga[1] - f2.grad).abs().max()))
            checked = True
        timed = actual <= time_max
        if timed:
            times = alternate_timing({v: (lambda v=v, a=(f1, f2, g): run_once(v, *a, args.tau)) for v in versions}, args.repeats, warmup=1)
            for v in versions:
                row[f"{v}_s"] = median(times[v])
            if "naive" in versions:
                row["time_ratio_naive_over_ours"] = row["naive_s"] / row["ours_s"]
            dev_inputs = (f1, f2, g)
        else:
            dev_inputs = make_inputs(tk, args.channels, device="meta")
        for v in versions:
            with LiveTensorBytes() as m:
                run_once(v, *dev_inputs, args.tau)
            row[f"{v}_peak_MiB"] = m.peak / 2**20
        row["memory_device"] = "cpu" if timed else "meta"
        if not naive_fits:
            row["naive"] = f"not run: needs ~{naive_bytes_estimate(actual) / 2**30:.0f} GiB"
        if timed and not args.no_rss:
            for v in versions:
                row[f"{v}_rss_MiB"] = rss_in_subprocess(v, tk, args) / 2**20
        if "naive_peak_MiB" in row:
            row["memory_ratio_naive_over_ours"] = row["naive_peak_MiB"] / row["ours_peak_MiB"]
        row["ours_bytes_per_token"] = row["ours_peak_MiB"] * 2**20 / actual
        rows.append(row)
        print(json.dumps(row), flush=True)
        del f1, f2, g, dev_inputs
    cols = ["tokens", "ours_s", "naive_s", "time_ratio_naive_over_ours", "ours_peak_MiB", "naive_peak_MiB",
            "memory_ratio_naive_over_ours", "ours_rss_MiB", "naive_rss_MiB", "ours_bytes_per_token", "memory_device", "naive"]
    md = (
        "## L_equiv vs the full-matrix approach (symmetric, forward+backward)\n\n"
        f"Token maps (n, {args.channels}, {GRID}, {GRID}), tau {args.tau}, torch threads {args.threads}; time: median of {args.repeats} alternating "
        "repeats; peak: tensor bytes alive during forward+backward (meta device where not timed); RSS: peak-RSS delta "
        "in a fresh process (fixed glibc mmap threshold).\n\n" + md_table(rows, cols) + "\n"
    )
    save("loss" + args.tag, {"rows": rows, "args": vars(args)}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
