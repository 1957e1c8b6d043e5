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
from dist_helpers.common import LAYER, make_images, make_pair, make_vit, naive_ser_loss, ser_step  # noqa: E402

from ser_plugin import TokenInfoNCE, attach_ser  # noqa: E402

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
    out = ser_step(vit, ser, make_pair(make_images(ddp_step.EVEN_N, seed=10), seed=11), holder, lr=ddp_step.LR)
    return out["host"], out["ser"], out["grads"], out["params"]


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



# ---------------------------------------------------------------------------------------------------------------
# The distributed contract (issue 9 class 9, issue 12 goal 2): tests/dist_helpers/contract_step.py, one launch.
from dist_helpers import contract_step  # noqa: E402
from dist_helpers.contract_step import VARIANTS, variant_inputs  # noqa: E402

from ser_plugin import rho  # noqa: E402


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    out = tmp_path_factory.mktemp("contract")
    _torchrun("contract_step.py", str(out), timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _ok(res, name):
    for r in (0, 1):
        assert "error" not in res[r][name], f"rank {r}, {name}: {res[r][name].get('error')}\n{res[r][name].get('traceback', '')}"
    return res[0][name], res[1][name]


def _naive_multi(chunks, tau=0.4, symmetric=True, same_branch=False, frame="view2", head=None):
    """Dense one-process L_equiv over several ranks' chunks ``(f1, f2, g, keys)`` (any grid per chunk), written from
    the method's description: queries of direction 1 are view 2's tokens, their positives view 1's tokens moved
    into view 2's frame; direction 2 swaps the roles on view 2's grid (frame="view2") or runs on view 1's grid with
    view 2's map moved into view 1's frame (frame="view1"); negatives are all key tokens (and, with same_branch,
    query-branch tokens) of every other image of every chunk; teacher keys replace the online keys."""
    hd = (lambda z: z) if head is None else (lambda z: head(z.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
    seq = lambda z: z.flatten(2).transpose(1, 2).reshape(-1, z.shape[1])  # noqa: E731
    dirs = {0: ([], [], [], [], []), 1: ([], [], [], [], [])}  # q, k, extra, q ids, extra ids
    img = 0
    for f1, f2, g, keys in chunks:
        z1, z2 = hd(f1), hd(f2)
        k1, k2 = (hd(keys[0]), hd(keys[1])) if keys is not None else (z1, z2)
        s2, s1 = tuple(f2.shape[-2:]), tuple(f1.shape[-2:])
        ids2 = torch.arange(img, img + f1.shape[0]).repeat_interleave(s2[0] * s2[1])
        ids1 = torch.arange(img, img + f1.shape[0]).repeat_interleave(s1[0] * s1[1])
        img += f1.shape[0]
        d0 = (seq(z2), seq(rho(k1, g, size=s2)), seq(z2), ids2)
        if frame == "view1":
            d1 = (seq(z1), seq(rho(k2, g.inverse(), size=s1)), seq(z1), ids1)
        else:
            za = seq(rho(z1, g, size=s2))
            d1 = (za, seq(k2), za, ids2)
        for d, (q, k, e, ids) in ((0, d0), (1, d1)):
            dirs[d][0].append(q)
            dirs[d][1].append(k)
            dirs[d][2].append(e)
            dirs[d][3].append(ids)

    def direction(d):
        q, k, e = (torch.nn.functional.normalize(torch.cat(dirs[d][j]).double(), dim=-1) for j in range(3))
        ids = torch.cat(dirs[d][3])
        pos = (q * k).sum(-1) / tau
        pool, pid = (torch.cat([k, e]), torch.cat([ids, ids])) if same_branch else (k, ids)
        s = (q @ pool.t() / tau).masked_fill(ids[:, None] == pid[None, :], float("-inf"))
        return (torch.logsumexp(torch.cat([pos[:, None], s], 1), 1) - pos).mean()

    return 0.5 * (direction(0) + direction(1)) if symmetric else direction(0)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "max_negatives"])
def test_gathered_loss_and_gradients_equal_one_process(contract, variant):
    """Every variant (teacher keys, same-branch negatives + head, one direction, the authors' frame under scale with a
    different grid per rank): 2 ranks give the one-process loss on the global batch and its gradients."""
    r0, r1 = _ok(contract, f"equiv_{variant}")
    kw, _, _, with_head = VARIANTS[variant]
    chunks = []
    for r in (0, 1):
        f1, f2, g, keys = variant_inputs(variant, r)
        chunks.append((f1.double().requires_grad_(True), f2.double().requires_grad_(True), g, None if keys is None else (keys[0].double(), keys[1].double())))
    head = contract_step.make_head().double() if with_head else None
    ref = _naive_multi(chunks, symmetric=kw.get("symmetric", True), same_branch=kw.get("same_branch_negatives", False),
                       frame=kw.get("scale_frame", "view2"), head=head)
    ref.backward()
    assert abs((r0["loss"] + r1["loss"]).item() / 2 - ref.item()) < 1e-5, (r0["loss"], r1["loss"], ref)
    for r, res in ((0, r0), (1, r1)):
        f1, f2 = chunks[r][:2]
        # rank r's map gradient is world x (d global loss / d its maps): each rank's loss is world * its share
        assert torch.allclose(res["g1"].double() / 2, f1.grad, atol=1e-6), (variant, r, (res["g1"] / 2 - f1.grad).abs().max())
        assert torch.allclose(res["g2"].double() / 2, f2.grad, atol=1e-6), (variant, r, (res["g2"] / 2 - f2.grad).abs().max())
    if with_head:
        for n, p in head.named_parameters():
            avg = (r0["head_grads"][n] + r1["head_grads"][n]).double() / 2  # DDP's averaging
            assert torch.allclose(avg, p.grad, atol=1e-6), n


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_at_most_three_collectives_and_no_host_sync_per_gathered_step(contract, variant):
    """Forward: one size exchange + one all-gather (both directions, keys and extras together); backward: one
    reduce-scatter (none with teacher keys). The loss's own code reads nothing back to the host."""
    for r, res in enumerate(_ok(contract, f"equiv_{variant}")):
        fwd, bwd = res["coll_fwd"], res["coll_bwd"]
        assert sum(fwd.values()) == 2 and sum(bwd.values()) == (0 if VARIANTS[variant][2] else 1), (variant, r, fwd, bwd)
        assert set(bwd) <= {"reduce_scatter_single", "reduce_scatter_tensor"}, bwd
        assert not res["syncs_fwd"] and not res["syncs_bwd"], (variant, r, res["sync_report"])


def test_ser_handle_step_under_ddp_issues_at_most_three_collectives(contract):
    r0, r1 = _ok(contract, "handle")
    for res in (r0, r1):
        assert sum(res["coll_fwd"].values()) + sum(res["coll_bwd"].values()) <= 3, (res["coll_fwd"], res["coll_bwd"])


def test_rank_without_b2_images_does_not_hang_and_equals_one_process(contract):
    r0, r1 = _ok(contract, "empty_rank")
    assert r0["ser"].item() == 0.0 and torch.isfinite(r1["ser"])
    model = contract_step.Patchify()
    x = make_images(sum(contract_step.EMPTY_COUNTS), seed=30)
    pair = make_pair(x[contract_step.EMPTY_COUNTS[0]:], seed=31)
    f1, f2 = model(pair.x1), model(pair.x2)
    loss = TokenInfoNCE()(f1, f2, pair.relative)
    host = model(make_images(4, seed=32)).pow(2).mean()
    (host + loss).backward()
    assert _close((r0["ser"] + r1["ser"]) / 2, loss.detach())
    for n, p in model.named_parameters():
        assert _close(r0["grads"][n], p.grad) and _close(r1["grads"][n], p.grad), n


def test_size_exchange_through_a_gloo_side_group_when_the_default_group_is_nccl(contract):
    """With a device-only default group (NCCL, simulated) the shape integers go through a gloo group made once:
    still 3 collectives, no host read, the same loss and gradients."""
    d0, d1 = _ok(contract, "equiv_default")
    for got, want in zip(_ok(contract, "side_group"), (d0, d1)):
        assert got["uses_side_group"] and got["side_groups"] == 1
        assert sum(got["coll_fwd"].values()) == 2 and sum(got["coll_bwd"].values()) == 1
        assert not got["syncs_fwd"] and not got["syncs_bwd"], got["sync_report"]
        assert torch.equal(got["loss"], want["loss"]) and torch.equal(got["g1"], want["g1"]) and torch.equal(got["g2"], want["g2"])


def test_no_rank_with_b2_images_gives_zero(contract):
    r0, r1 = _ok(contract, "all_empty")
    assert r0["loss"].item() == 0.0 == r1["loss"].item() and r0["grad_shape"] == (0, 6, 3, 3)


def test_logging_loss_on_one_rank_does_not_hang_or_change_the_step(contract):
    r0, r1 = _ok(contract, "nograd_log")
    assert r0["log_collectives"] == 0
    assert torch.isfinite(r0["log_nograd"]) and torch.allclose(r0["log_nograd"], r0["log_nogather"])
    chunks = []
    for r in (0, 1):
        f1, f2, g, _ = variant_inputs("default", r)
        chunks.append((f1.double(), f2.double(), g, None))
    ref = _naive_multi(chunks)
    assert abs((r0["loss"] + r1["loss"]).item() / 2 - ref.item()) < 1e-5


def test_nonfinite_map_on_another_rank_is_reported_as_such(contract):
    r0, r1 = _ok(contract, "remote_nonfinite")
    assert r0["message"] and "rank 1" in r0["message"] and "tau" not in r0["message"], r0["message"]
    assert r1["message"] and "view 1" in r1["message"] and "NaN" in r1["message"], r1["message"]


def test_fsdp2_fully_shard_equals_one_process(contract):
    """FSDP2 (fully_shard per block and root, 2 gloo ranks on CPU) + SER handle: the one-process step on 8 images."""
    r0, r1 = _ok(contract, "fsdp")
    host, ser_loss, grads = _reference_wrapped()
    assert _close((r0["ser"] + r1["ser"]) / 2, ser_loss)
    assert _close((r0["host"] + r1["host"]) / 2, host)
    _assert_same_grads(r0["grads"], grads, "FSDP2, rank 0")
    _assert_same_grads(r1["grads"], grads, "FSDP2, rank 1")
    assert sum(r0["coll_fwd"].values()) == 2, r0["coll_fwd"]


# ---------------------------------------------------------------------------------------------------------------
# A rank with no b2 images through the whole handle (issue 17 class 1): tests/dist_helpers/edges_step.py, one launch.
from dist_helpers import edges_step  # noqa: E402

from ser_plugin import GroupElement, ViewPair  # noqa: E402


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    out = tmp_path_factory.mktemp("edges")
    _torchrun("edges_step.py", str(out), timeout=240)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _reference_union(counts, head=True):
    """One process on the union of both ranks' b2 views (the same views, concatenated) and host images."""
    vit = make_vit(0)
    torch.manual_seed(1)
    ser = attach_ser(vit, LAYER, head=head, head_dims=(16, 16))
    pairs = [edges_step.rank_views(ser, counts, r) for r in (0, 1)]
    pair = ViewPair(torch.cat([p.x1 for p in pairs]), torch.cat([p.x2 for p in pairs]),
                    GroupElement.cat([p.g1 for p in pairs]), GroupElement.cat([p.g2 for p in pairs]))
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    host = vit(torch.cat([edges_step.host_images(r) for r in (0, 1)])).pow(2).mean()
    ser_loss = ser.loss(pair)
    (host + ser_loss).backward()
    holder = nn.Module()
    holder.vit, holder.ser = vit, ser
    return ser_loss.detach(), {n: p.grad.detach().clone() for n, p in holder.named_parameters()}


@pytest.mark.parametrize("name", list(edges_step.COUNTS))
def test_rank_without_b2_images_through_the_handle_equals_one_process(edges, name):
    """b2 sizes (3, 0), (0, 3), (1, 1) over 2 DDP ranks, through ser.views, ser.capture and ser.loss (token head,
    built-in photometrics): the empty rank's loss is exactly 0, joins the collectives, and every rank's loss and
    gradients equal one process on the union. ``skip_passes*``: the empty rank runs no pass at all."""
    counts = edges_step.COUNTS[name]
    r0, r1 = _ok(edges, name)
    assert (r0["n"], r1["n"]) == counts
    for res, n in ((r0, counts[0]), (r1, counts[1])):
        if n == 0:
            assert res["ser"].item() == 0.0
    ser_loss, grads = _reference_union(counts, edges_step.HEAD[name])
    assert ser_loss.item() > 0 and _close((r0["ser"] + r1["ser"]) / 2, ser_loss), (r0["ser"], r1["ser"], ser_loss)
    _assert_same_grads(r0["grads"], grads, f"{name}, rank 0")
    _assert_same_grads(r1["grads"], grads, f"{name}, rank 1")
    assert any(k.startswith("ser.head.") and v.abs().sum() > 0 for k, v in grads.items()) == edges_step.HEAD[name]


def test_one_b2_image_over_all_ranks_is_refused_on_every_rank(edges):
    """b2 sizes (1, 0): one image has no negatives anywhere; every rank raises the same SERError after the size
    exchange (none waits in a collective), as one process refuses one image."""
    for r in (0, 1):
        err = edges[r]["b2_1_0"].get("error", "")
        assert err.startswith("SERError") and "1 image over all 2 ranks" in err and "[1, 0]" in err, (r, err)
