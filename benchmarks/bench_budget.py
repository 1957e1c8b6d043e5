"""Benchmark 2 (equivariance side): does the negative budget keep SER's equivariance gain?

A small side-by-side check, not the study (``study/`` holds the full one): a tiny timm ViT
(16 px digits from scikit-learn, patch 2 -> 64 tokens, dim 64, depth 4) trained with a SimCLR-style host
loss, three arms with the same seed, data order and views: no SER (``lam=0``: same views, no L_equiv),
SER with all negatives, and SER with ``max_negatives`` (a shared random subset of key tokens per
direction). Reported: the equivariance score at the SER layer on held-out digits (``centred`` separates
methods; ``raw`` has a high floor), the last L_equiv value, and each arm's time.

    PYTHONPATH=$PWD python benchmarks/bench_budget.py --steps 150
    PYTHONPATH=$PWD python benchmarks/bench_budget.py --steps 400 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm  # noqa: E402
from common import md_table, save  # noqa: E402

from ser_plugin import attach_ser, equivariance_score  # noqa: E402


def digits(size: int = 16):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x[:1500], x[1500:]


def host_view(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Host augmentation: random shift by up to 2 px (pad and crop) and a little noise."""
    b, _, h, w = x.shape
    pad = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=gen).tolist()
    return pad[..., dy : dy + h, dx : dx + w] + 0.05 * torch.randn(x.shape, generator=gen)


def nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    z = F.normalize(torch.cat([a, b]), dim=1)
    sim = z @ z.t() / tau
    sim.fill_diagonal_(float("-inf"))
    n = a.shape[0]
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, target)


def train_arm(train: torch.Tensor, test: torch.Tensor, args: argparse.Namespace, seed: int, lam: float, max_negatives: Optional[int]) -> Dict:
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=2, embed_dim=64, depth=4, num_heads=2, in_chans=1, num_classes=0)
    proj = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    ser = attach_ser(model, layer=args.layer, lam=lam, tau=0.4, photometric=None, max_negatives=max_negatives)
    opt = torch.optim.AdamW(list(model.parameters()) + list(proj.parameters()) + list(ser.parameters()), lr=1e-3, weight_decay=0.05)
    data_gen = torch.Generator().manual_seed(seed)
    view_gen = torch.Generator().manual_seed(seed + 1000)
    n = max(2, round(args.b2 * args.batch))
    last = float("nan")
    t0 = time.perf_counter()
    for _ in range(args.steps):
        idx = torch.randint(0, train.shape[0], (args.batch,), generator=data_gen)
        x = train[idx]
        a1, a2 = host_view(x[n:], data_gen), host_view(x[n:], data_gen)
        pair = ser.views(x[:n], generator=view_gen)
        with ser.capture():
            v1, v2 = model(pair.x1), model(pair.x2)
        e1, e2 = model(a1), model(a2)
        loss = nt_xent(proj(torch.cat([e1, v1])), proj(torch.cat([e2, v2]))) + ser.loss(pair)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = float(ser.last_loss)
    elapsed = time.perf_counter() - t0
    score = equivariance_score(model, test[: args.eval_images], layers=args.layer)[args.layer]
    ser.remove()
    return {"centred": score["centred"], "raw": score["raw"], "last_L_equiv": last, "seconds": elapsed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--b2", type=float, default=0.25)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--budget", type=int, default=256, help="max_negatives (the full pool is b2 images x 64 tokens)")
    p.add_argument("--seeds", type=int, nargs="*", default=[0])
    p.add_argument("--eval-images", type=int, default=256)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default="", help="suffix of the result file name (perf_budget<tag>.json)")
    args = p.parse_args()
    torch.set_num_threads(1)
    train, test = digits()
    arms = [("no SER (lam=0, same views)", 0.0, None), ("SER, all negatives", 1.0, None), (f"SER, max_negatives={args.budget}", 1.0, args.budget)]
    rows: List[Dict] = []
    for seed in args.seeds:
        for name, lam, mneg in arms:
            r = {"arm": name, "seed": seed, **train_arm(train, test, args, seed, lam, mneg)}
            rows.append(r)
            print(json.dumps(r), flush=True)
    pool = max(2, round(args.b2 * args.batch)) * 64
    md = (
        f"## Negative budget: equivariance with and without it (digits 16 px, ViT dim 64 depth 4, layer {args.layer}, "
        f"batch {args.batch}, b2 {args.b2:g}, {args.steps} steps)\n\n"
        f"Same seed, data order and views in every arm; the full negative pool per direction is {pool} key tokens, the budget "
        f"{args.budget}. Score: equivariance_score on {args.eval_images} held-out digits at layer {args.layer}.\n\n"
        + md_table(rows, ["arm", "seed", "centred", "raw", "last_L_equiv", "seconds"]) + "\n"
    )
    save("budget" + args.tag, {"rows": rows, "args": vars(args)}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
