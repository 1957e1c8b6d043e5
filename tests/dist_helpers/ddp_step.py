"""One SER training step under torch.distributed (gloo, CPU); run by torchrun, writes rank<r>.pt to --out.

Scenarios (all in one launch, to pay the process start-up once):

* ``even``: DDP over a wrapper holding the ViT and the SER handle (so the token head is a DDP parameter),
  4 images per rank, host loss + SER loss (head=True), one SGD step.
* ``uneven``: 1 image on rank 0 and 5 on rank 1, a timm ViT with dynamic_img_size and a different view
  size (hence grid size) on each rank, host + SER loss, one SGD step.
* ``wrapped``: attach_ser on the DDP wrapper itself (what users will try), host + SER loss.
* ``nogather``: ``wrapped`` with gather=False — the control that shows the comparison can fail.
* ``forward_loss``: ser.forward_loss (encoder run by SER, early exit) beside a host loss.
* ``ser_only``: SER as the only loss, the encoder to block L run through DDP's forward; two steps.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit, ser_step, slice_pair, torchrun_main  # noqa: E402
from ser_plugin import attach_ser  # noqa: E402

EVEN_N = 8
UNEVEN_COUNTS = (1, 5)
UNEVEN_SIZES = (((16, 16), (20, 20)), ((12, 16), (16, 20)))  # per rank: (view 1 size, view 2 size)
LR = 0.5


class Holder(nn.Module):
    """The pattern the docs recommend under DDP: the SER handle (token head) lives next to the model."""

    def __init__(self, vit: nn.Module, ser: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.ser = ser

    def forward(self, x):
        return self.vit(x)


def even(r: int, world: int) -> dict:
    vit = make_vit(0)
    torch.manual_seed(1)
    ser = attach_ser(vit, LAYER, head=True, head_dims=(16, 16), photometric=None)
    holder = nn.parallel.DistributedDataParallel(Holder(vit, ser))
    pair = slice_pair(make_pair(make_images(EVEN_N, seed=10), seed=11), r * (EVEN_N // world), (r + 1) * (EVEN_N // world))
    return ser_step(holder, ser, pair, holder.module, lr=LR)


def uneven(r: int, world: int) -> dict:
    """Uneven images per rank and a different grid per rank; host loss weighted per image of the global batch."""
    vit = make_vit(0, dynamic=True)
    ser = attach_ser(vit, LAYER, photometric=None, scale=(0.5, 2.0))
    model = nn.parallel.DistributedDataParallel(vit)
    start = sum(UNEVEN_COUNTS[:r])
    x = make_images(sum(UNEVEN_COUNTS), seed=20)[start : start + UNEVEN_COUNTS[r]]
    pair = make_pair(x, seed=21 + r, sizes=UNEVEN_SIZES[r])
    # the host loss must touch every parameter (DDP waits for all of them); with uneven batches its
    # per-rank share is world * sum_local / N_global, like SER's, so DDP's averaging gives the global mean
    return ser_step(model, ser, pair, model.module, lr=LR, host=lambda o1, o2: (o1 - o2).pow(2).sum(1).sum() * world / sum(UNEVEN_COUNTS))


def wrapped(r: int, world: int, gather: str = "auto") -> dict:
    """attach_ser on the DDP wrapper itself (users will do this); host loss + SER loss, one step."""
    vit = make_vit(0)
    model = nn.parallel.DistributedDataParallel(vit)
    ser = attach_ser(model, LAYER, photometric=None, gather=gather)
    pair = slice_pair(make_pair(make_images(EVEN_N, seed=10), seed=11), r * (EVEN_N // world), (r + 1) * (EVEN_N // world))
    return ser_step(model, ser, pair, vit)


def nogather(r: int, world: int) -> dict:
    """The same step with gather=False (each rank's negatives local): must NOT match one process."""
    return wrapped(r, world, gather=False)


def forward_loss(r: int, world: int) -> dict:
    """ser.forward_loss (SER runs the encoder itself, early exit) next to a host loss through the DDP wrapper."""
    vit = make_vit(0)
    model = nn.parallel.DistributedDataParallel(vit)
    ser = attach_ser(model, LAYER, photometric=None)
    x = make_images(EVEN_N, seed=10)
    per = EVEN_N // world
    pair = slice_pair(make_pair(x, seed=11), r * per, (r + 1) * per)
    host = model(x[r * per : (r + 1) * per]).pow(2).mean()
    ser_loss = ser.forward_loss(pair)
    (host + ser_loss).backward()
    return {"host": host.detach(), "ser": ser_loss.detach(), "grads": {n: p.grad.detach().clone() for n, p in vit.named_parameters()}}


class EncodeL(nn.Module):
    """SER as the only loss: DDP must see the encoder run to block L, so it runs through this module's forward."""

    def __init__(self, vit: nn.Module, ser: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.ser = ser

    def forward(self, x):
        return self.ser.encode(x)


def ser_only(r: int, world: int) -> dict:
    """No host loss: DDP(EncodeL, find_unused_parameters=True), two steps (DDP itself fails step 2 if misused)."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    enc = nn.parallel.DistributedDataParallel(EncodeL(vit, ser), find_unused_parameters=True)
    opt = torch.optim.SGD(enc.parameters(), lr=LR)
    x = make_images(EVEN_N, seed=10)
    per = EVEN_N // world
    out = {}
    for step in range(2):
        pair = slice_pair(make_pair(x, seed=40 + step), r * per, (r + 1) * per)
        f1, f2 = enc(pair.x1), enc(pair.x2)
        loss = ser.criterion(f1, f2, pair.relative)
        opt.zero_grad()
        loss.backward()
        out[f"ser{step}"] = loss.detach()
        out[f"grads{step}"] = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for n, p in vit.named_parameters()}
        opt.step()
    return out


def main() -> None:
    torchrun_main((("even", even), ("uneven", uneven), ("wrapped", wrapped), ("nogather", nogather), ("forward_loss", forward_loss),
                   ("ser_only", ser_only)))


if __name__ == "__main__":
    main()
