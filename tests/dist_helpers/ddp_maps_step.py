"""One SER step on a CNN map under DDP (gloo, CPU, 2 processes); run by torchrun, writes rank<r>.pt to --out.

Scenario ``convnext``: a tiny timm ConvNeXt (LayerNorm, so no batch statistics differ between ranks), SER at
layer 2 (``stages.1``, stride 2), DDP over it, 4 of 8 images per rank, host + SER loss, one SGD step.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_helpers.common import make_images, make_pair, run_scenarios, slice_pair  # noqa: E402
from ser_plugin import attach_ser  # noqa: E402

N, LAYER, LR = 8, 2, 0.5


def make_convnext(seed: int = 0) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(seed)
    return ConvNeXt(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), patch_size=1)


def convnext(r: int, world: int) -> dict:
    net = make_convnext(0)
    ser = attach_ser(net, LAYER, photometric=None)
    model = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    per = N // world
    pair = slice_pair(make_pair(make_images(N, seed=30), seed=31), r * per, (r + 1) * per)
    with ser.capture():
        o1, o2 = model(pair.x1), model(pair.x2)
    host = (o1 - o2).pow(2).mean()
    ser_loss = ser.loss(pair)
    (host + ser_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    return {"host": host.detach(), "ser": ser_loss.detach(), "grads": grads, "params": {n: p.detach().clone() for n, p in net.named_parameters()}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    run_scenarios([("convnext", convnext)], args.out)


if __name__ == "__main__":
    main()
