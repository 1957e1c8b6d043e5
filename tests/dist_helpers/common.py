"""Deterministic tiny model, data and views shared by the torchrun helpers and the single-process references.

Everything here is a pure function of its seed, so rank r of a 2-process run and the single-process
reference in the test see bit-identical weights, images and group elements.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ser_plugin import GroupElement, ViewPair, act_image, rho

IMG = 16
PATCH = 4
LAYER = 2


def make_vit(seed: int = 0, dynamic: bool = False) -> nn.Module:
    """A 3-block ViT (dim 32, patch 4, 16x16 inputs) with a [CLS] token; deterministic weights."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=IMG, patch_size=PATCH, embed_dim=32, depth=3,
        num_heads=2, num_classes=0, dynamic_img_size=dynamic,
    )


def make_images(n: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, IMG, IMG, generator=g)


def make_pair(x: Tensor, seed: int, sizes: Tuple[Tuple[int, int], Tuple[int, int]] | None = None) -> ViewPair:
    """Two views of ``x`` with seeded per-sample D4 elements; ``sizes`` adds one scale per view."""
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    elems = []
    for v in range(2):
        rot = torch.randint(0, 4, (n,), generator=g)
        flip = torch.randint(0, 2, (n,), generator=g).bool()
        if sizes is None:
            elems.append(GroupElement.from_d4(rot, flip))
        else:
            h, w = sizes[v]
            elems.append(GroupElement.from_d4(rot, flip, scale=(h / IMG, w / IMG)))
    x1 = act_image(x, elems[0], size=None if sizes is None else sizes[0])
    x2 = act_image(x, elems[1], size=None if sizes is None else sizes[1])
    return ViewPair(x1, x2, elems[0], elems[1])


def slice_pair(pair: ViewPair, start: int, end: int) -> ViewPair:
    return ViewPair(pair.x1[start:end], pair.x2[start:end], pair.g1[start:end], pair.g2[start:end])


def naive_ser_loss(maps: List[Tuple[Tensor, Tensor, GroupElement]], tau: float) -> Tensor:
    """Hand-written symmetric token InfoNCE over a list of chunks ``(f1, f2, relative)`` with any grid per chunk.

    Dense ``(N, M)`` similarities, explicit masks, no chunking and no distributed code: the independent
    reference for what N ranks must compute together. Negatives of a query: every key token of every
    other image (over all chunks); positive: the aligned token of the same image.
    """
    qa, ka, qb, kb, ids = [], [], [], [], []
    offset = 0
    for f1, f2, rel in maps:
        z1a = rho(f1, rel, size=tuple(f2.shape[-2:]))
        n, c = f2.shape[:2]
        t2 = f2.flatten(2).transpose(1, 2).reshape(-1, c)
        t1 = z1a.flatten(2).transpose(1, 2).reshape(-1, c)
        qa.append(t2)
        ka.append(t1)
        qb.append(t1)
        kb.append(t2)
        ids.append(torch.arange(n).repeat_interleave(f2.shape[-2] * f2.shape[-1]) + offset)
        offset += n
    iid = torch.cat(ids)
    same = iid[:, None] == iid[None, :]

    def direction(q: Tensor, k: Tensor) -> Tensor:
        s = F.normalize(q.float(), dim=-1) @ F.normalize(k.float(), dim=-1).t() / tau
        pos = s.diagonal()
        neg = s.masked_fill(same, float("-inf"))
        allowed = torch.cat([pos[:, None], neg], dim=1)
        return (torch.logsumexp(allowed, dim=1) - pos).mean()

    return 0.5 * (direction(torch.cat(qa), torch.cat(ka)) + direction(torch.cat(qb), torch.cat(kb)))


def flat_grads(model: nn.Module) -> Dict[str, Tensor]:
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _full(g: Tensor) -> Tensor:
    return g.full_tensor() if hasattr(g, "full_tensor") else g  # FSDP2 holds DTensor shards


def ser_step(call: Callable[[Tensor], Tensor], ser: Any, pair: ViewPair, params_of: nn.Module, lr: Optional[float] = None,
             host: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Dict[str, Any]:
    """The step every equivalence test compares: both views forwarded through ``call`` (the model, or its DDP /
    FSDP wrapper) inside ``ser.capture()``, host loss (default: mean squared difference of the outputs, a
    per-sample mean that DDP's averaging turns into the global mean) + ``ser.loss(pair)``, backward; then, with
    ``lr``, one SGD step on ``params_of``. Returns host, ser (detached), grads and, with ``lr``, params (full
    tensors, keyed by ``params_of.named_parameters()``)."""
    with ser.capture():
        o1, o2 = call(pair.x1), call(pair.x2)
    h = host(o1, o2) if host is not None else (o1 - o2).pow(2).mean()
    ser_loss = ser.loss(pair)
    (h + ser_loss).backward()
    out: Dict[str, Any] = {"host": h.detach(), "ser": ser_loss.detach(),
                           "grads": {n: _full(p.grad).detach().clone() for n, p in params_of.named_parameters() if p.grad is not None}}
    if lr is not None:
        torch.optim.SGD(params_of.parameters(), lr=lr).step()
        out["params"] = {n: _full(p.detach()).clone() for n, p in params_of.named_parameters()}
    return out


#: where the views' own host syncs come from (guarded by tests/test_views*_sync.py); any other site is the step's
VIEW_SITES = ("group.py", "views.py", "photometric.py", "color_jiggle.py", "gaussian.py", "kornia")


def step_syncs(model: nn.Module, ser: Any, x: Tensor) -> Any:
    """Host syncs (benchmarks/sync_counter.py ``Counts``) of one whole SER step — views of ``x[:4]``, both views'
    passes inside ``ser.capture()``, a host loss that also forwards ``x[4:]``, backward — the second of two, so
    first-call caches and lazy state are not counted."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks"))
    from sync_counter import count_syncs

    for _ in range(2):
        with count_syncs() as c:
            pair = ser.views(x[:4])
            with ser.capture():
                o1, o2 = model(pair.x1), model(pair.x2)
            host = model(x[4:]).pow(2).mean() + (o1 - o2).pow(2).mean()
            (host + ser.loss(pair)).backward()
    return c


def fully_shard_all(model: nn.Module, modules: Sequence[nn.Module], world: int) -> None:
    """FSDP2 on CPU: ``fully_shard`` on each of ``modules`` (blocks / stages), then on ``model``, over a 1-D mesh."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # older torch
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    for m in modules:
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)


def torchrun_main(scenarios: Sequence[Tuple[str, Callable[[int, int], Any]]], timeout: Optional[timedelta] = None) -> None:
    """The ``main`` of a torchrun helper: ``--out`` (folder for rank<r>.pt) and ``--only`` (scenario names), one torch
    thread, a gloo process group (``timeout``: its default when None), then :func:`run_scenarios`."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", **({"timeout": timeout} if timeout is not None else {}))
    run_scenarios(scenarios, args.out, args.only)


def run_scenarios(scenarios: Sequence[Tuple[str, Callable[[int, int], Any]]], out_dir: str, only: Optional[Sequence[str]] = None) -> None:
    """Runs each ``(name, fn(rank, world))`` on this rank (an error is recorded, not raised, so the test can show it),
    with a barrier after each, saves ``rank<r>.pt`` in ``out_dir`` and destroys the process group."""
    r, world = dist.get_rank(), dist.get_world_size()
    res: Dict[str, Any] = {"world": world}
    for name, fn in scenarios:
        if only and name not in only:
            continue
        try:
            res[name] = fn(r, world)
        except Exception as e:  # noqa: BLE001 - recorded for the test
            res[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        dist.barrier()
    torch.save(res, os.path.join(out_dir, f"rank{r}.pt"))
    dist.destroy_process_group()
