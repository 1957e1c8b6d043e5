"""SER under torch.distributed: N processes must take the same step as one process on the global batch.

The pattern of lightly's ``tests/utils/test_dist__gather__losses.py`` (2-process DDP equals 1 process),
done as real 2-process runs: ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU, a free localhost
port) runs a helper from ``tests/dist_helpers``; the single-process reference is computed here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers import ddp_step, lightning_step  # noqa: E402
from dist_helpers.common import LAYER, make_images, make_pair, make_vit, naive_ser_loss  # noqa: E402

from ser_plugin import attach_ser  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ATOL, RTOL = 2e-5, 1e-4


def _torchrun(script: str, out: str, timeout: int = 150) -> None:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [
        # --standalone: rendezvous on a free localhost port chosen by torchrun itself (no port races between runs)
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        os.path.join(HERE, "dist_helpers", script), "--out", out,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, atol=ATOL, rtol=RTOL)


def _assert_same_grads(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys()
    bad = [n for n in want if not _close(got[n], want[n])]
    assert not bad, f"{what}: gradients differ from one process on the global batch for {bad[:5]} " + ", ".join(
        f"{n}: max|d|={(got[n] - want[n]).abs().max():.2e}" for n in bad[:3]
    )


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    _torchrun("ddp_step.py", str(out))
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for name in ("even", "uneven", "wrapped", "nogather", "forward_loss", "ser_only"):
        for r in (0, 1):
            assert "error" not in res[r][name], f"rank {r}, scenario {name}: {res[r][name].get('error')}\n{res[r][name].get('traceback', '')}"
    return res


class _Holder(nn.Module):
    def __init__(self, vit, ser):
        super().__init__()
        self.vit, self.ser = vit, ser


def _reference_even():
    """One process, all 8 images: the step ddp_step.even takes on 2 x 4."""
    vit = make_vit(0)
    torch.manual_seed(1)
    ser = attach_ser(vit, LAYER, head=True, head_dims=(16, 16), photometric=None)
    holder = _Holder(vit, ser)
    pair = make_pair(make_images(ddp_step.EVEN_N, seed=10), seed=11)
    with ser.capture():
        o1, o2 = vit(pair.x1), vit(pair.x2)
    host = (o1 - o2).pow(2).mean()
    ser_loss = ser.loss(pair)
    (host + ser_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in holder.named_parameters()}
    torch.optim.SGD(holder.parameters(), lr=ddp_step.LR).step()
    return host.detach(), ser_loss.detach(), grads, {n: p.detach().clone() for n, p in holder.named_parameters()}


def test_ddp_even_split_equals_one_process(ddp_results):
    """2 ranks x 4 images, host + SER loss with token head: same losses, gradients and SGD update as 1 x 8."""
    host, ser_loss, grads, params = _reference_even()
    r0, r1 = ddp_results[0]["even"], ddp_results[1]["even"]
    assert ddp_results[0]["world"] == 2
    # each rank returns world * (its share of the global mean): the ranks' average is the global loss
    assert _close((r0["ser"] + r1["ser"]) / 2, ser_loss), ((r0["ser"] + r1["ser"]) / 2, ser_loss)
    assert _close((r0["host"] + r1["host"]) / 2, host)
    assert not _close(r0["ser"], r1["ser"])  # the ranks really saw different images
    _assert_same_grads(r0["grads"], grads, "even split, rank 0")
    _assert_same_grads(r1["grads"], grads, "even split, rank 1")
    assert any(k.startswith("ser.head.") for k in grads), "the token head must take part (and be synced by DDP)"
    for n in params:
        assert _close(r0["params"][n], params[n]) and _close(r1["params"][n], params[n]), f"parameter {n} after one SGD step differs"


def _reference_uneven():
    """One process, naive dense loss over both ranks' chunks (1 and 5 images, different grids)."""
    vit = make_vit(0, dynamic=True)
    ser = attach_ser(vit, LAYER, photometric=None, scale=(0.5, 2.0))
    counts = ddp_step.UNEVEN_COUNTS
    x = make_images(sum(counts), seed=20)
    chunks, host = [], 0.0
    for r, c in enumerate(counts):
        start = sum(counts[:r])
        pair = make_pair(x[start : start + c], seed=21 + r, sizes=ddp_step.UNEVEN_SIZES[r])
        with ser.capture():
            o1, o2 = vit(pair.x1), vit(pair.x2)
        f1, f2 = ser.captures
        ser.clear()
        chunks.append((f1, f2, pair.relative))
        host = host + (o1 - o2).pow(2).sum(1).sum() / sum(counts)
    loss = naive_ser_loss(chunks, tau=ser.criterion.tau)
    (host + loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in vit.named_parameters()}
    torch.optim.SGD(vit.parameters(), lr=ddp_step.LR).step()
    params = {n: p.detach().clone() for n, p in vit.named_parameters()}
    return host.detach(), loss.detach(), grads, params, [tuple(c[1].shape[-2:]) for c in chunks]


def test_ddp_uneven_batches_and_grids_equal_one_process(ddp_results):
    """Rank 0 has 1 image, rank 1 has 5, each with its own view sizes (scale views, dynamic_img_size ViT)."""
    host, loss, grads, params, grids = _reference_uneven()
    assert len(set(grids)) == 2, f"the ranks must use different grids, got {grids}"
    r0, r1 = ddp_results[0]["uneven"], ddp_results[1]["uneven"]
    assert _close((r0["ser"] + r1["ser"]) / 2, loss), ((r0["ser"] + r1["ser"]) / 2, loss)
    assert _close((r0["host"] + r1["host"]) / 2, host)
    _assert_same_grads(r0["grads"], grads, "uneven, rank 0")
    _assert_same_grads(r1["grads"], grads, "uneven, rank 1")
    for n in params:
        assert _close(r0["params"][n], params[n]) and _close(r1["params"][n], params[n]), f"parameter {n} after one SGD step differs"


def _reference_wrapped():
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    pair = make_pair(make_images(ddp_step.EVEN_N, seed=10), seed=11)
    with ser.capture():
        o1, o2 = vit(pair.x1), vit(pair.x2)
    host = (o1 - o2).pow(2).mean()
    ser_loss = ser.loss(pair)
    (host + ser_loss).backward()
    return host.detach(), ser_loss.detach(), {n: p.grad.detach().clone() for n, p in vit.named_parameters()}


def test_attach_to_ddp_wrapper_equals_one_process(ddp_results):
    """attach_ser(DistributedDataParallel(vit), L) hooks the wrapped ViT and gives the one-process step."""
    host, ser_loss, grads = _reference_wrapped()
    r0, r1 = ddp_results[0]["wrapped"], ddp_results[1]["wrapped"]
    assert _close((r0["ser"] + r1["ser"]) / 2, ser_loss)
    _assert_same_grads(r0["grads"], grads, "attached to DDP wrapper")


def test_without_gather_the_step_differs(ddp_results):
    """Control: with gather=False each rank only sees its own negatives, and the comparison above fails."""
    _, ser_loss, grads = _reference_wrapped()
    r0, r1 = ddp_results[0]["nogather"], ddp_results[1]["nogather"]
    assert not _close((r0["ser"] + r1["ser"]) / 2, ser_loss)
    assert any(not _close(r0["grads"][n], grads[n]) for n in grads)


def test_forward_loss_under_ddp_equals_one_process(ddp_results):
    """ser.forward_loss (SER runs the encoder, stops after block L) next to a host loss through DDP."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    x = make_images(ddp_step.EVEN_N, seed=10)
    pair = make_pair(x, seed=11)
    host = vit(x).pow(2).mean()
    ser_loss = ser.forward_loss(pair)
    (host + ser_loss).backward()
    grads = {n: p.grad.detach().clone() for n, p in vit.named_parameters()}
    r0, r1 = ddp_results[0]["forward_loss"], ddp_results[1]["forward_loss"]
    assert _close((r0["ser"] + r1["ser"]) / 2, ser_loss.detach())
    _assert_same_grads(r0["grads"], grads, "forward_loss, rank 0")
    _assert_same_grads(r1["grads"], grads, "forward_loss, rank 1")


def test_ser_as_only_loss_through_ddp_forward(ddp_results):
    """SER alone (no host loss): DDP(module whose forward is ser.encode, find_unused_parameters=True).
    Two steps, each equal to one process (a plain DDP(vit) here would leave step 1 unsynced, then fail)."""
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    opt = torch.optim.SGD(vit.parameters(), lr=ddp_step.LR)
    x = make_images(ddp_step.EVEN_N, seed=10)
    for step in range(2):
        pair = make_pair(x, seed=40 + step)
        loss = ser.criterion(ser.encode(pair.x1), ser.encode(pair.x2), pair.relative)
        opt.zero_grad()
        loss.backward()
        grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone() for n, p in vit.named_parameters()}
        opt.step()
        r0, r1 = ddp_results[0]["ser_only"], ddp_results[1]["ser_only"]
        assert _close((r0[f"ser{step}"] + r1[f"ser{step}"]) / 2, loss.detach())
        _assert_same_grads(r0[f"grads{step}"], grads, f"SER only, step {step}, rank 0")
        _assert_same_grads(r1[f"grads{step}"], grads, f"SER only, step {step}, rank 1")


def test_lightning_ddp_strategy_equals_one_process(tmp_path):
    """Lightning Trainer(strategy='ddp', devices=2, accelerator='cpu'): one step equals one process."""
    out = tmp_path / "light.pt"
    _torchrun("lightning_step.py", str(out))
    got = torch.load(out, weights_only=False)
    assert got["world"] == 2
    module = lightning_step.SERModule()
    x, rot, flip = lightning_step.dataset().tensors
    pair = lightning_step.batch_to_pair((x, rot, flip))
    with module.ser.capture():
        o1, o2 = module.vit(pair.x1), module.vit(pair.x2)
    host = (o1 - o2).pow(2).mean()
    ser_loss = module.ser.loss(pair)
    (host + ser_loss).backward()
    torch.optim.SGD(module.parameters(), lr=lightning_step.LR).step()
    assert _close(got["ser"], ser_loss.detach()), (got["ser"], ser_loss)
    assert _close(got["host"], host.detach())
    moved = 0
    for n, p in module.named_parameters():
        assert _close(got["params"][n], p.detach()), f"{n} differs after one Lightning DDP step"
        moved += int(n.startswith("ser.head."))
    assert moved > 0

