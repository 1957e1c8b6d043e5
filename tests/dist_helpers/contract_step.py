"""The distributed contract of L_equiv, 2 gloo processes (run by torchrun; writes rank<r>.pt to --out).

Scenarios (one launch; each records its results or its error, then all ranks meet at a barrier):

* ``equiv_<variant>``: TokenInfoNCE on this rank's slice of seeded global maps (different grid per rank for the
  scale variants); loss, the maps' gradients, and the collectives / host syncs of forward and backward.
* ``handle``: a DDP step through the SER handle (capture + ser.loss + backward): collectives SER issued.
* ``empty_rank``: rank 0 has no b2 images this step, rank 1 has 4; a DDP model, host loss on both ranks.
* ``nograd_log``: rank 0 first computes an extra loss for logging, under no_grad (gather="auto") and with
  gather=False; then both ranks take the training step.
* ``remote_nonfinite``: rank 1's view-1 map has a NaN; each rank's raise_if_nonfinite message.
* ``fsdp``: FSDP2 (fully_shard on every block and the root) + SER handle, host + SER loss, full gradients.
"""

from __future__ import annotations

import functools
import os
import sys
from datetime import timedelta
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "benchmarks"))

from sync_counter import count_collectives, count_syncs  # noqa: E402

from dist_helpers.common import LAYER, fully_shard_all, make_images, make_pair, make_vit, slice_pair, torchrun_main  # noqa: E402
from ser_plugin import GroupElement, TokenHead, TokenInfoNCE, attach_ser  # noqa: E402

PER_RANK = 3
C = 6
#: per variant: TokenInfoNCE kwargs, (view 1 grid, view 2 grid) per rank, teacher keys, token head
VARIANTS: Dict[str, Tuple[dict, Tuple[Tuple[Tuple[int, int], Tuple[int, int]], ...], bool, bool]] = {
    "default": ({}, (((3, 3), (3, 3)), ((3, 3), (3, 3))), False, False),
    "keys": ({}, (((3, 3), (3, 3)), ((3, 3), (3, 3))), True, False),
    "same_branch_head": ({"same_branch_negatives": True}, (((3, 3), (3, 3)), ((3, 3), (3, 3))), False, True),
    "one_direction": ({"symmetric": False}, (((3, 3), (3, 3)), ((3, 3), (3, 3))), False, False),
    "view1_scale": ({"scale_frame": "view1"}, (((3, 3), (4, 4)), ((4, 4), (2, 2))), False, False),
    "view1_scale_keys": ({"scale_frame": "view1"}, (((3, 3), (4, 4)), ((4, 4), (2, 2))), True, False),
    "max_negatives": ({"max_negatives": 5}, (((3, 3), (3, 3)), ((3, 3), (3, 3))), False, False),
}


def variant_inputs(name: str, r: int):
    """Rank r's maps, keys and relative elements of a variant (a pure function of the seed; the test rebuilds
    every rank's inputs to form the one-process reference)."""
    _, grids, with_keys, _ = VARIANTS[name]
    (h1, w1), (h2, w2) = grids[r]
    gen = torch.Generator().manual_seed(100 + r)
    f1 = torch.randn(PER_RANK, C, h1, w1, generator=gen)
    f2 = torch.randn(PER_RANK, C, h2, w2, generator=gen)
    rot = torch.randint(0, 4, (PER_RANK,), generator=gen)
    flip = torch.randint(0, 2, (PER_RANK,), generator=gen)
    scale = (h2 / h1, w2 / w1) if (h1, w1) != (h2, w2) else None
    if scale is not None:
        rot = rot * 0 + 2 * (rot % 2)  # even turns keep the square grids' orientation; sizes carry the scale
    g = GroupElement.from_d4(rot, flip, scale=scale)
    keys = (torch.randn(f1.shape, generator=gen), torch.randn(f2.shape, generator=gen)) if with_keys else None
    return f1, f2, g, keys


def make_head() -> nn.Module:
    torch.manual_seed(7)
    return TokenHead(C, 8, 8)


def _syncs_outside_group(c) -> List[Tuple[str, str]]:
    return [(op, where) for op, where in c.events if not where.startswith("group.py")]


def equiv(name: str, r: int, world: int) -> dict:
    kw, _, _, with_head = VARIANTS[name]
    f1, f2, g, keys = variant_inputs(name, r)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    head = make_head() if with_head else None
    crit = TokenInfoNCE(**kw)
    torch.manual_seed(1000 + r)
    with count_collectives() as cf, count_syncs() as sf:
        loss = crit(f1, f2, g, keys=keys, head=head)
    with count_collectives() as cb, count_syncs() as sb:
        loss.backward()
    out = {
        "loss": loss.detach(), "g1": f1.grad.clone(), "g2": f2.grad.clone(),
        "coll_fwd": dict(cf.by_op), "coll_bwd": dict(cb.by_op), "elements": {**cf.elements, **cb.elements},
        "syncs_fwd": _syncs_outside_group(sf), "syncs_bwd": _syncs_outside_group(sb),
        "syncs_total": sf.total + sb.total, "sync_report": sf.report() + "\n" + sb.report(),
    }
    if head is not None:
        out["head_grads"] = {n: p.grad.clone() for n, p in head.named_parameters()}
    return out


def handle(r: int, world: int) -> dict:
    """A DDP step through the SER handle: the collectives SER adds to a step (DDP's own buckets run in C++)."""
    vit = make_vit(0)
    model = nn.parallel.DistributedDataParallel(vit)
    ser = attach_ser(model, LAYER, photometric=None)
    x = make_images(8, seed=10)
    pair = slice_pair(make_pair(x, seed=11), r * 4, (r + 1) * 4)
    with ser.capture():
        o1, o2 = model(pair.x1), model(pair.x2)
    host = (o1 - o2).pow(2).mean()
    with count_collectives() as cf:
        ser_loss = ser.loss(pair)
    with count_collectives() as cb:
        (host + ser_loss).backward()
    return {"coll_fwd": dict(cf.by_op), "coll_bwd": dict(cb.by_op), "ser": ser_loss.detach()}


class Patchify(nn.Module):
    """A tiny encoder to token maps (no [CLS]): conv patch embedding + one 1x1 mixing layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Conv2d(3, C, 4, stride=4)
        self.mix = nn.Conv2d(C, C, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(torch.tanh(self.embed(x)))


EMPTY_COUNTS = (0, 4)


def empty_rank(r: int, world: int) -> dict:
    """Rank 0 has no b2 images (its view tensors have 0 rows), rank 1 has 4; host images on both ranks."""
    model = nn.parallel.DistributedDataParallel(Patchify())
    crit = TokenInfoNCE()
    x = make_images(sum(EMPTY_COUNTS), seed=30)
    start = sum(EMPTY_COUNTS[:r])
    pair = make_pair(x[start : start + EMPTY_COUNTS[r]], seed=31)
    host_x = make_images(4, seed=32)[2 * r : 2 * r + 2]
    f1, f2 = model(pair.x1), model(pair.x2)
    host = model(host_x).pow(2).mean()
    loss = crit(f1, f2, pair.relative)
    (host + loss).backward()
    return {"ser": loss.detach(), "host": host.detach(), "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}}


def side_group(r: int, world: int) -> dict:
    """The default group reported as NCCL (CPU tensors not allowed): the sizes go through a gloo side group made
    at the first call. Second call counted; results equal to the default group's (equiv_default)."""
    import ser_plugin.distributed as sd

    real = sd.dist.get_backend
    sd.dist.get_backend = lambda *a, **k: "nccl"
    try:
        equiv("default", r, world)  # first call: creates the side group
        out = equiv("default", r, world)
        out["side_groups"] = len(sd._HOST_GROUPS)
        out["uses_side_group"] = sd._host_group()[1] is not None
    finally:
        sd.dist.get_backend = real
    return out


def all_empty(r: int, world: int) -> dict:
    """No rank has b2 images this step: every rank still calls the loss; 0, finite, backward runs."""
    f1 = torch.zeros(0, C, 3, 3, requires_grad=True)
    f2 = torch.zeros(0, C, 3, 3, requires_grad=True)
    g = GroupElement.from_d4(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
    loss = TokenInfoNCE()(f1, f2, g)
    loss.backward()
    return {"loss": loss.detach(), "grad_shape": tuple(f1.grad.shape)}


def nograd_log(r: int, world: int) -> dict:
    """Rank 0 logs an extra loss (under no_grad with gather='auto', then with gather=False) before the step."""
    f1, f2, g, _ = variant_inputs("default", r)
    f1.requires_grad_(True)
    f2.requires_grad_(True)
    crit = TokenInfoNCE()
    out = {}
    if r == 0:
        with count_collectives() as c:
            with torch.no_grad():
                out["log_nograd"] = crit(f1, f2, g)
            out["log_nogather"] = crit(f1, f2, g, gather=False).detach()
        out["log_collectives"] = c.total
    loss = crit(f1, f2, g)
    loss.backward()
    out.update({"loss": loss.detach(), "g1": f1.grad.clone(), "g2": f2.grad.clone()})
    return out


def remote_nonfinite(r: int, world: int) -> dict:
    from ser_plugin.loss import raise_if_nonfinite

    f1, f2, g, _ = variant_inputs("default", r)
    if r == 1:
        f1[1, 2, 0, 0] = float("nan")
    crit = TokenInfoNCE()
    loss = crit(f1, f2, g)
    try:
        raise_if_nonfinite(loss, [("view 1", f1), ("view 2", f2)], where=f"layer {LAYER}", remote=crit.last_remote_finite)
        msg = None
    except Exception as e:  # noqa: BLE001 - recorded for the test
        msg = f"{type(e).__name__}: {e}"
    return {"message": msg, "loss": loss.detach()}


def fsdp(r: int, world: int) -> dict:
    vit = make_vit(0)
    fully_shard_all(vit, vit.blocks, world)
    ser = attach_ser(vit, LAYER, photometric=None)
    x = make_images(8, seed=10)
    pair = slice_pair(make_pair(x, seed=11), r * 4, (r + 1) * 4)
    with ser.capture():
        o1, o2 = vit(pair.x1), vit(pair.x2)
    host = (o1 - o2).pow(2).mean()
    with count_collectives() as cf:
        ser_loss = ser.loss(pair)
    (host + ser_loss).backward()
    grads = {n: p.grad.full_tensor().detach().clone() for n, p in vit.named_parameters()}
    return {"host": host.detach(), "ser": ser_loss.detach(), "grads": grads, "coll_fwd": dict(cf.by_op)}


def scenarios():
    out = [(f"equiv_{v}", functools.partial(equiv, v)) for v in VARIANTS]
    return out + [("handle", handle), ("empty_rank", empty_rank), ("all_empty", all_empty), ("side_group", side_group), ("nograd_log", nograd_log),
                  ("remote_nonfinite", remote_nonfinite), ("fsdp", fsdp)]


def main() -> None:
    torchrun_main(scenarios(), timeout=timedelta(seconds=30))


if __name__ == "__main__":
    main()
