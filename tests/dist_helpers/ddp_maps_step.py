"""SER steps on a CNN map under torch.distributed (gloo, CPU, 2 processes); run by torchrun, writes rank<r>.pt to --out.

The model is a tiny timm ConvNeXt (LayerNorm, so no batch statistics differ between ranks), SER at layer 2
(``stages.1``, stride 2), 4 of 8 images per rank, host + SER loss:

* ``convnext``: DDP over the model, one SGD step.
* ``convnext_fsdp``: FSDP2 (``fully_shard`` on every stage and the root), full gradients.
* ``convnext_chunked``: DDP with the memory-linear loss forced to tiny chunks (``chunk_elements=7``), one SGD step.

Each must equal the one-process step on all 8 images (tests/test_backbones.py).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_helpers.common import fully_shard_all, make_images, make_pair, ser_step, slice_pair, torchrun_main  # noqa: E402
from ser_plugin import attach_ser  # noqa: E402

N, LAYER, LR = 8, 2, 0.5
CHUNK = 7  # similarity entries per chunk: far below one image's (h*w)^2 = 64, so the chunked path runs


def make_convnext(seed: int = 0) -> nn.Module:
    from timm.models.convnext import ConvNeXt

    torch.manual_seed(seed)
    return ConvNeXt(num_classes=0, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), patch_size=1)


def rank_pair(r: int, world: int):  # noqa: ANN201
    per = N // world
    return slice_pair(make_pair(make_images(N, seed=30), seed=31), r * per, (r + 1) * per)


def convnext(r: int, world: int, **options) -> dict:  # noqa: ANN003
    net = make_convnext(0)
    ser = attach_ser(net, LAYER, photometric=None, **options)
    return ser_step(nn.parallel.DistributedDataParallel(net), ser, rank_pair(r, world), net, lr=LR)


def convnext_fsdp(r: int, world: int) -> dict:
    net = make_convnext(0)
    fully_shard_all(net, net.stages, world)
    ser = attach_ser(net, LAYER, photometric=None)
    out = ser_step(net, ser, rank_pair(r, world), net)
    out["sharded"] = type(next(net.parameters())).__name__
    return out


def main() -> None:
    torchrun_main([("convnext", convnext), ("convnext_fsdp", convnext_fsdp),
                   ("convnext_chunked", lambda r, w: convnext(r, w, chunk_elements=CHUNK))])


if __name__ == "__main__":
    main()
