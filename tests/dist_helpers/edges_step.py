"""A rank with no b2 images, through the whole handle (views, capture, loss) under DDP, 2 gloo processes (run by
torchrun; writes rank<r>.pt to --out). Issue 17, class 1.

Scenarios ``b2_<n0>_<n1>``: rank r has ``n_r`` b2 images (0 allowed) made into views by ``ser.views`` (built-in
photometrics, a seeded generator per rank) and 2 host images; the host loss and ``ser.loss`` are summed and
back-propagated through DDP. ``skip_passes``: like ``b2_3_0`` but the empty rank skips its forward passes and calls
``ser.loss`` on the empty pair with nothing captured; ``skip_passes_no_head``: the same on rank 0 of (0, 3) without
a token head (the empty rank must still take part in the backward reduce-scatter). ``b2_1_0``: one image over all
ranks, refused on every rank (no hang).
"""

from __future__ import annotations

import functools
import os
import sys
from datetime import timedelta
from typing import Tuple

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dist_helpers.common import LAYER, make_images, make_vit, torchrun_main  # noqa: E402
from ser_plugin import ViewPair, attach_ser  # noqa: E402

COUNTS = {"b2_3_0": (3, 0), "b2_0_3": (0, 3), "b2_1_1": (1, 1), "skip_passes": (3, 0), "skip_passes_no_head": (0, 3)}
HEAD = {name: name != "skip_passes_no_head" for name in COUNTS}
REFUSED = {"b2_1_0": (1, 0)}
HOST_PER_RANK = 2


def rank_views(ser, counts: Tuple[int, ...], r: int) -> ViewPair:
    """Rank r's b2 images (a slice of one seeded global batch) and its views (a seeded generator per rank)."""
    start = sum(counts[:r])
    x = make_images(sum(counts), seed=50)[start : start + counts[r]]
    return ser.views(x, generator=torch.Generator().manual_seed(60 + r))


def host_images(r: int) -> torch.Tensor:
    return make_images(2 * HOST_PER_RANK, seed=52)[r * HOST_PER_RANK : (r + 1) * HOST_PER_RANK]


def step(name: str, r: int, world: int) -> dict:
    counts = COUNTS.get(name) or REFUSED[name]
    vit = make_vit(0)
    torch.manual_seed(1)
    ser = attach_ser(vit, LAYER, head=HEAD.get(name, True), head_dims=(16, 16))
    holder = nn.Module()
    holder.vit, holder.ser = vit, ser
    holder.forward = vit.forward
    model = nn.parallel.DistributedDataParallel(holder)
    pair = rank_views(ser, counts, r)
    if not (name.startswith("skip_passes") and counts[r] == 0):
        with ser.capture():
            model(pair.x1), model(pair.x2)
    host = model(host_images(r)).pow(2).mean()
    ser_loss = ser.loss(pair)
    (host + ser_loss).backward()
    return {"ser": ser_loss.detach(), "host": host.detach(), "n": len(pair.g1),
            "grads": {n: p.grad.detach().clone() for n, p in holder.named_parameters()}}


def main() -> None:
    torchrun_main([(name, functools.partial(step, name)) for name in list(COUNTS) + list(REFUSED)], timeout=timedelta(seconds=30))


if __name__ == "__main__":
    main()
