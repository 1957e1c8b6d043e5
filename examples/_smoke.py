"""What the MoCo-v3 and DINO smoke steps share (examples/moco_v3/smoke_step.py, examples/dino/smoke_step.py): tiny
generated images, the command line and process spawning, per-block gradient norms of the SER term, the
capture-hook count, and the cross-rank report of a multi-process step. Not part of ser_plugin."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Iterable, List, Sequence

import numpy as np
import torch
import torch.distributed as dist


class Images(torch.utils.data.Dataset):
    """``n`` random RGB images of ``size`` px (PIL), seeded, through the host's ``transform``; label 0."""

    def __init__(self, n: int, size: int, transform: Callable[[Any], Any], seed: int = 0) -> None:
        from PIL import Image

        rng = np.random.default_rng(seed)
        self.images = [Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")) for _ in range(n)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.images[i]), 0


def main(run: Callable[[int, argparse.Namespace], None], port_base: int) -> None:
    """Parses the smoke step's flags and runs ``run(rank, opts)`` in one process or spawns ``--world-size`` of them."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--layer", type=int, default=2)
    ap.add_argument("--head", action="store_true")
    ap.add_argument("--late-cls", action="store_true")
    ap.add_argument("--world-size", type=int, default=1, help="> 1: that many gloo processes (DDP and SER's gather)")
    opts = ap.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port_base + os.getpid() % 1000))
    if opts.world_size > 1:
        torch.multiprocessing.spawn(run, args=(opts,), nprocs=opts.world_size)
    else:
        run(0, opts)


def block_grad_norms(term: torch.Tensor, blocks: Sequence[torch.nn.Module]) -> List[float]:
    """Per block, the gradient norm of ``term`` alone (0 for a block it does not reach)."""
    params = [p for b in blocks for p in b.parameters()]
    grads = torch.autograd.grad(term, params, allow_unused=True, retain_graph=True)
    out, i = [], 0
    for b in blocks:
        k = len(list(b.parameters()))
        out.append(float(sum(float(g.norm()) ** 2 for g in grads[i : i + k] if g is not None) ** 0.5))
        i += k
    return out


def capture_hooks(blocks: Iterable[torch.nn.Module]) -> int:
    """How many SER capture hooks the blocks carry."""
    return sum(type(h).__name__ == "_CaptureHook" for b in blocks for h in b._forward_hooks.values())


def report(values: dict) -> None:
    print("SER_REPORT " + json.dumps(values))


def report_ranks(rank: int, world_size: int, params: Iterable[torch.Tensor], ser: torch.nn.Module, ser_loss: float, head_moved: List[bool]) -> None:
    """After a multi-process step: every rank's weights (SER's included) gathered; rank 0 reports the largest
    difference across ranks and each rank's SER loss; then the process group is destroyed."""
    flat = torch.cat([p.detach().flatten() for p in params])
    every = [torch.zeros_like(flat) for _ in range(world_size)]
    dist.all_gather(every, flat)
    losses = [torch.zeros(1) for _ in range(world_size)]
    dist.all_gather(losses, torch.tensor([ser_loss]))
    if rank == 0:
        report({
            "world_size": world_size,
            "max_param_diff_across_ranks": max(float((f - every[0]).abs().max()) for f in every),
            "ser_losses_per_rank": [float(v) for v in losses],
            "ser_params": sum(p.numel() for p in ser.parameters()),
            "ser_params_updated": all(head_moved) if head_moved else None,
        })
    dist.destroy_process_group()
