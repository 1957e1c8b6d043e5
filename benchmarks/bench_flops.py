"""Benchmark 1 and 2 (FLOPs): one MoCo-v3-style training step with SER vs without, counted on ``meta``.

The step (written for this benchmark after MoCo-v3's recipe, not copied): ViT-S/16 base encoder with a
3-layer projector (4096 hidden, 256 out, BN) and a 2-layer predictor, a momentum copy of encoder and
projector, two views per image, symmetric InfoNCE against the momentum keys of all ranks (T = 0.2).
With SER the ``b2`` share of the per-GPU batch is replaced by the two equivariant views of ``b2`` images
(matched view budget, as in the paper): their final embeddings enter the host loss unchanged, and
``ser.loss(pair)`` adds L_equiv on layer 3's token maps. So the encoder work is identical and the
difference is L_equiv (and the token head when ``head=True``).

Counting: ``torch.utils.flop_counter.FlopCounterMode`` over forward, backward and the optimizer step,
on the ``meta`` device (shapes only, no compute). Multi-GPU keys are simulated: ``world_size`` reports 8
and the all-gather returns 8 copies of the local rows, so both the host's and SER's losses see 8x the
keys, as on 8 GPUs (per-GPU FLOPs are reported). FlopCounterMode counts matmuls, convolutions and
attention only (elementwise ops count 0, as in fvcore-style counts); the cross-check runs a small ViT on
the CPU (with the formula this project registers for CPU attention), on meta, and against a hand count.

    PYTHONPATH=$PWD python benchmarks/bench_flops.py            # all figures (about a minute, no compute)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import timm  # noqa: E402
from common import flop_counter, md_table, patch_rho_for_meta, save  # noqa: E402

import ser_plugin.loss as loss_mod  # noqa: E402
from ser_plugin import GroupElement, TokenInfoNCE, ViewPair, attach_ser  # noqa: E402

# ---------------------------------------------------------------------------------------------- model
#: --model: timm architecture, SER layer, that layer's stride and channels. The CNN / Swin layers are the ones
#: whose map has the ViT-S/16 grid (14x14 at 224 px): ResNet-50 layer 4 (layer3 output, stride 16, 1024 ch) and
#: Swin-T layer 3 (layers.2, stride 16, 384 ch), in the convention of ser_plugin.backbones.
MODELS = {
    "vit_small": ("vit_small_patch16_224", 3, 16, 384),
    "resnet50": ("resnet50", 4, 16, 1024),
    "swin_tiny": ("swin_tiny_patch4_window7_224", 3, 16, 384),
}
CNN_ARCHS = ("resnet50",)
def mlp(dim_in: int, hidden: int, dim_out: int, layers: int) -> nn.Sequential:
    mods: List[nn.Module] = []
    d = dim_in
    for i in range(layers):
        last = i == layers - 1
        mods.append(nn.Linear(d, dim_out if last else hidden, bias=False))
        mods.append(nn.BatchNorm1d(dim_out if last else hidden, affine=not last))
        if not last:
            mods.append(nn.ReLU(inplace=True))
        d = hidden
    return nn.Sequential(*mods)


class MoCoV3Like(nn.Module):
    def __init__(self, img_size: int = 224, arch: str = "vit_small_patch16_224", hidden: int = 4096, **vit_kw) -> None:
        super().__init__()
        size_kw = {} if arch in CNN_ARCHS else {"img_size": img_size}  # timm CNNs take any size
        self.base = timm.create_model(arch, num_classes=0, **size_kw, **vit_kw)
        dim = self.base.num_features  # the pooled output (= embed_dim for a ViT)
        self.projector = mlp(dim, hidden, 256, 3)
        self.predictor = mlp(256, hidden, 256, 2)
        self.m_base = copy.deepcopy(self.base)
        self.m_projector = copy.deepcopy(self.projector)
        for p in list(self.m_base.parameters()) + list(self.m_projector.parameters()):
            p.requires_grad_(False)

    def online(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.projector(self.base(x)))

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return self.m_projector(self.m_base(x))

    def step_loss(self, x1: torch.Tensor, x2: torch.Tensor, world: int, ser: Any = None, pair: Any = None) -> torch.Tensor:
        """The MoCo-v3 loss of one step; with SER, the first ``len(pair.x1)`` rows' views are SER's (matched budget)."""
        if ser is None:
            q1, q2 = self.online(x1), self.online(x2)
            k1, k2 = self.keys(x1), self.keys(x2)
            return host_contrastive(q1, k2, world) + host_contrastive(q2, k1, world)
        n = pair.x1.shape[0]
        with ser.capture():
            v1, v2 = self.base(pair.x1), self.base(pair.x2)
        e1, e2 = self.base(x1[n:]), self.base(x2[n:])
        q1 = self.predictor(self.projector(torch.cat([e1, v1])))
        q2 = self.predictor(self.projector(torch.cat([e2, v2])))
        k1 = self.keys(torch.cat([x1[n:], pair.x1]))
        k2 = self.keys(torch.cat([x2[n:], pair.x2]))
        return host_contrastive(q1, k2, world) + host_contrastive(q2, k1, world) + ser.loss(pair)


class SimulatedRanks:
    """Makes ser_plugin's loss (and the host loss) see ``world`` ranks' keys: every rank has the local sizes and
    the gathered buffer holds ``world`` copies of the local rows (the loss's size exchange and all-gather)."""

    def __init__(self, world: int, images: int, tokens: int) -> None:
        self.world, self.images, self.tokens = world, images, tokens

    def exchange_sizes(self, sizes, device=None):
        return [list(sizes) for _ in range(self.world)]

    def gather_padded(self, x: torch.Tensor, width: int) -> torch.Tensor:
        assert x.shape[0] == width, "simulated ranks all have the local sizes"
        return torch.stack([x] * self.world)

    _NAMES = ("world_size", "rank", "exchange_sizes", "gather_padded")

    def __enter__(self) -> SimulatedRanks:
        self._saved = tuple(getattr(loss_mod, n) for n in self._NAMES)
        loss_mod.world_size, loss_mod.rank = (lambda: self.world), (lambda: 0)
        loss_mod.exchange_sizes, loss_mod.gather_padded = self.exchange_sizes, self.gather_padded
        return self

    def __exit__(self, *exc) -> None:
        for n, v in zip(self._NAMES, self._saved):
            setattr(loss_mod, n, v)


def host_contrastive(q: torch.Tensor, k: torch.Tensor, world: int, temp: float = 0.2) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    k = torch.cat([k] * world)  # all-gathered momentum keys (no grad)
    logits = q @ k.t() / temp
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * 2 * temp


def count_step(img: int, batch: int, b2: float, world: int, max_negatives: Optional[int] = None,
               head: bool = False, layer: int = 3, ser_on: bool = True, arch: str = "vit_small_patch16_224", hidden: int = 4096,
               stride: int = 16) -> Dict:
    """Total FLOPs (and the SER loss's share) of one training step on meta."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MoCoV3Like(img, arch, hidden=hidden)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x1 = torch.empty(batch, 3, img, img, device="meta")
    x2 = torch.empty(batch, 3, img, img, device="meta")
    n = max(2, round(b2 * batch)) if ser_on else 0
    ser = None
    if ser_on:
        ser = attach_ser(model.base, layer=layer, photometric=None, check_finite=False, head=head,
                         max_negatives=max_negatives, gather="auto")
        ser.to("meta")
        opt.add_param_group({"params": list(ser.parameters()) or [torch.empty(0, device="meta", requires_grad=True)]})
        g1, g2 = GroupElement.random(n), GroupElement.random(n)
        pair = ViewPair(x1[:n].clone(), x2[:n].clone(), g1, g2)  # the views' pixels: shapes are what counts
    t = (img // stride) ** 2
    fc = flop_counter()
    with fc, SimulatedRanks(world, n, t):
        loss = model.step_loss(x1, x2, world, ser if ser_on else None, pair if ser_on else None)
        loss.backward()
        opt.step()
    counts = {str(k): int(v) for k, v in fc.get_flop_counts()["Global"].items()}
    if ser is not None:
        ser.remove()
    return {"total": int(fc.get_total_flops()), "by_op": counts, "b2_images": n, "tokens_per_image": t}


def loss_only_flops(n: int, t: int, c: int, world: int, max_negatives: Optional[int]) -> int:
    """FLOPs of L_equiv alone (forward + backward) on meta maps, keys from ``world`` simulated ranks."""
    f1 = torch.empty(n, c, int(t**0.5), int(t**0.5), device="meta", requires_grad=True)
    f2 = torch.empty_like(f1).requires_grad_(True)
    fc = flop_counter()
    with fc, SimulatedRanks(world, n, t):
        TokenInfoNCE(0.4, gather=world > 1, max_negatives=max_negatives)(f1, f2, GroupElement.random(n)).backward()
    return int(fc.get_total_flops())


def analytic_loss_flops(n: int, t: int, c: int, world: int, max_negatives: Optional[int]) -> int:
    """Hand count: per direction N x M x C matmuls: forward 1, backward 3 (recompute, dq, dk), i.e. 8NMC;
    the single-process symmetric case shares one matrix for both directions (8N²C in all)."""
    nq = n * t
    m = nq * world
    if max_negatives is not None:
        m = min(m, max_negatives)
    if world == 1 and max_negatives is None:
        return 8 * nq * nq * c
    return 2 * 8 * nq * m * c


# ---------------------------------------------------------------------------------------------- cross-check
def analytic_vit_flops(img: int, patch: int, dim: int, depth: int, mlp_ratio: float = 4.0, prefix: int = 1) -> Dict[str, int]:
    """Hand count of a ViT's matmul FLOPs per image (2 per multiply-add): forward, and a training step
    (backward = 2x forward for every matmul, except the patch embedding, whose input needs no gradient)."""
    t = (img // patch) ** 2
    nt = t + prefix
    embed = 2 * t * 3 * patch * patch * dim
    hidden = int(dim * mlp_ratio)
    block = 2 * nt * dim * 3 * dim + 2 * 2 * nt * nt * dim + 2 * nt * dim * dim + 2 * 2 * nt * dim * hidden
    fwd = embed + depth * block
    return {"forward": fwd, "train": 3 * fwd - embed}


def cross_check() -> Dict:
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=0)
    out: Dict = {}
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        with torch.device(device):
            m = timm.create_model("vit_tiny_patch16_224", **kw)
        x = torch.randn(4, 3, 32, 32, device=device)
        fc = flop_counter()
        with fc:
            m(x)
        fwd = fc.get_total_flops()
        fc = flop_counter()
        with fc:
            m(x).sum().backward()
        out[f"{device}_forward"] = int(fwd)
        out[f"{device}_train"] = int(fc.get_total_flops())
    a = analytic_vit_flops(32, 8, 64, 2)
    out["analytic_forward"] = 4 * a["forward"]
    out["analytic_train"] = 4 * a["train"]
    # the loss's custom autograd function: its matmuls are aten ops inside forward/backward, so they count
    gen = torch.Generator().manual_seed(0)
    for world, mneg, name in ((1, None, "fused"), (8, None, "gathered"), (8, 100, "budget")):
        f1 = torch.randn(4, 16, 3, 3, generator=gen, requires_grad=True)
        f2 = torch.randn(4, 16, 3, 3, generator=gen, requires_grad=True)
        fc = flop_counter()
        with fc, SimulatedRanks(world, 4, 9):
            TokenInfoNCE(0.4, gather=world > 1, max_negatives=mneg)(f1, f2, GroupElement.random(4, generator=gen)).backward()
        out[f"loss_{name}_cpu"] = int(fc.get_total_flops())
        out[f"loss_{name}_analytic"] = analytic_loss_flops(4, 9, 16, world, mneg)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256, help="per-GPU batch")
    p.add_argument("--world", type=int, default=8, help="simulated GPUs whose keys the losses see")
    p.add_argument("--budget", type=int, default=4096, help="max_negatives for the budget rows")
    p.add_argument("--quick", action="store_true", help="a tiny ViT at 64 px, 3 configurations, 256-wide heads (smoke test)")
    p.add_argument("--model", default="vit_small", choices=list(MODELS), help="backbone (CNN / Swin: 224 px, b2 1 %% and 10 %%)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    patch_rho_for_meta()
    if args.model != "vit_small":
        other_model(args)
        return
    check = cross_check()
    print(json.dumps({"cross_check": check}), flush=True)
    arch, sizes = ("vit_small_patch16_224", [224, 320, 448]) if not args.quick else ("vit_tiny_patch16_224", [64])
    hidden = 256 if args.quick else 4096
    rows: List[Dict] = []
    for img in sizes:
        bases: Dict[int, Dict] = {}
        shares = [0.01, 0.10, 0.25] if img == sizes[0] else [0.01, 0.10]
        configs = [(b2, None, False, args.world) for b2 in shares]
        configs += [(b2, args.budget, False, args.world) for b2 in shares if b2 > 0.01 or img == sizes[0]]
        if img == sizes[0]:
            configs += [(0.01, None, True, args.world)] + [(b2, None, False, 1) for b2 in shares]
        if args.quick:
            configs = [(0.25, None, False, args.world), (0.25, args.budget, False, args.world), (0.25, None, False, 1)]
        for b2, mneg, head, world in configs:
            r = count_step(img, args.batch, b2, world, max_negatives=mneg, head=head, arch=arch, hidden=hidden)
            if world not in bases:
                bases[world] = count_step(img, args.batch, 0.0, world, ser_on=False, arch=arch, hidden=hidden)
            base_w = bases[world]
            row = {
                "img": img, "tokens_per_image": r["tokens_per_image"], "b2": b2, "b2_images": r["b2_images"],
                "keys_from_gpus": world, "max_negatives": mneg, "head": head,
                "flops_without": base_w["total"], "flops_with": r["total"], "ratio": r["total"] / base_w["total"],
            }
            c = 192 if arch == "vit_tiny_patch16_224" else 384
            row["loss_ratio_analytic"] = 1 + analytic_loss_flops(r["b2_images"], r["tokens_per_image"], c, world, mneg) / base_w["total"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    cols = ["img", "tokens_per_image", "b2", "b2_images", "keys_from_gpus", "max_negatives", "head", "ratio", "loss_ratio_analytic"]
    md = (
        f"## FLOPs of one MoCo-v3-style training step, with SER / without (per GPU, batch {args.batch}, layer 3)\n\n"
        "Counted with FlopCounterMode on the meta device (matmuls, convolutions, attention; forward, backward, "
        f"AdamW step). keys_from_gpus = {args.world}: both losses see the keys of {args.world} simulated ranks. "
        "loss_ratio_analytic: 1 + hand-counted L_equiv FLOPs / counted step without SER.\n\n"
        + md_table(rows, cols)
        + "\n\n### Cross-check (small ViT: 32 px, patch 8, dim 64, depth 2, batch 4; and L_equiv on 4 maps 16x3x3)\n\n"
        + md_table([{"what": k, "flops": v} for k, v in check.items()], ["what", "flops"])
        + "\n"
    )
    save("flops", {"rows": rows, "cross_check": check, "args": vars(args)}, md, args.out)
    print(md)


def other_model(args: argparse.Namespace) -> None:
    """ResNet-50 / Swin-T at 224 px: SER at the layer of MODELS, b2 = 1 % (the paper's share) and 10 %."""
    arch, layer, stride, c = MODELS[args.model]
    rows: List[Dict] = []
    bases: Dict[int, Dict] = {}
    for b2, world in ((0.01, args.world), (0.10, args.world), (0.01, 1), (0.10, 1)):
        r = count_step(224, args.batch, b2, world, layer=layer, arch=arch, stride=stride)
        if world not in bases:
            bases[world] = count_step(224, args.batch, 0.0, world, ser_on=False, layer=layer, arch=arch, stride=stride)
        row = {"model": args.model, "layer": layer, "tokens_per_image": r["tokens_per_image"], "channels": c, "b2": b2,
               "b2_images": r["b2_images"], "keys_from_gpus": world, "flops_without": bases[world]["total"], "flops_with": r["total"],
               "ratio": r["total"] / bases[world]["total"],
               "loss_ratio_analytic": 1 + analytic_loss_flops(r["b2_images"], r["tokens_per_image"], c, world, None) / bases[world]["total"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    cols = ["model", "layer", "tokens_per_image", "channels", "b2", "b2_images", "keys_from_gpus", "ratio", "loss_ratio_analytic"]
    md = (f"## FLOPs of one MoCo-v3-style step with SER / without: {arch} (per GPU, batch {args.batch}, 224 px, layer {layer})\n\n"
          f"`PYTHONPATH=$PWD python benchmarks/bench_flops.py --model {args.model}`. Counted as for the ViT table (meta device, "
          "FlopCounterMode: matmuls, convolutions, attention; forward, backward, AdamW step). keys_from_gpus: both losses see "
          "the keys of that many simulated ranks.\n\n" + md_table(rows, cols) + "\n")
    save(f"flops_{args.model}", {"rows": rows, "args": vars(args)}, md, args.out)
    print(md)


if __name__ == "__main__":
    main()
