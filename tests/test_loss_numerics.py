"""L_equiv numerics and hot-path properties: no NaN gradient behind a finite loss (issue 9, class 8), the
non-finite checks (`raise_if_nonfinite`, `FiniteCheck`), zero host syncs in forward + backward (issue 12),
the per-call gather switch, the authors' frame for the second direction (`scale_frame="view1"`) and the
factor 2 between online and stop-gradient keys."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ser_plugin import GroupElement, SERError, TokenHead, TokenInfoNCE, rho
from ser_plugin.loss import FiniteCheck, negative_logsumexp, raise_if_nonfinite

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sync_counter import count_syncs  # noqa: E402


def _maps(n=3, c=6, h=3, w=3, seed=0, h2=None, w2=None, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, c, h, w, generator=gen, dtype=dtype, requires_grad=True)
    f2 = torch.randn(n, c, h2 or h, w2 or w, generator=gen, dtype=dtype, requires_grad=True)
    g = GroupElement.from_d4(torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen))
    return f1, f2, g


def _grads_finite(*ts):
    return all(t.grad is not None and bool(torch.isfinite(t.grad).all()) for t in ts)


# ------------------------------------------------------------------ class 8: no NaN gradient behind a finite loss
@pytest.mark.parametrize("same_branch", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_max_negatives_one_gives_finite_loss_and_gradient(same_branch, symmetric):
    """A pool of one key token: the queries of that token's image have no negative at all (all masked)."""
    f1, f2, g = _maps(n=3)
    torch.manual_seed(0)
    loss = TokenInfoNCE(max_negatives=1, symmetric=symmetric, same_branch_negatives=same_branch)(f1, f2, g)
    assert torch.isfinite(loss)
    loss.backward()
    assert _grads_finite(f1, f2), (f1.grad, f2.grad)


@pytest.mark.parametrize("keys", [False, True])
def test_one_image_with_gather_outside_a_group_is_refused_like_without(keys):
    """One image, gather=True, one process: no negative exists (the loss would be exactly 0 with zero gradient, a
    silent no-op), so it is refused as without gather."""
    f1, f2, g = _maps(n=1)
    kw = {"keys": (f1.detach() + 0.1, f2.detach() - 0.1)} if keys else {}
    with pytest.raises(SERError, match="at least 2 images") as err:
        TokenInfoNCE(gather=True)(f1, f2, g, **kw)
    assert "no process group" in str(err.value)


def test_query_without_any_negative_costs_exactly_zero_with_zero_gradient():
    """Every key masked (all of the query's own image, e.g. a max_negatives draw): lse = -inf, the query's
    -log softmax = softplus(-inf) = 0, and its gradient is 0, not NaN."""
    q = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    ids = torch.zeros(4, dtype=torch.long)
    lse = negative_logsumexp(q, k, ids, ids, 0.4)
    assert torch.isneginf(lse).all()
    loss = F.softplus(lse - (q * k).sum(-1) / 0.4).sum()
    assert loss.item() == 0.0
    loss.backward()
    assert _grads_finite(q, k) and q.grad.abs().max() == 0 and k.grad.abs().max() == 0


def test_no_images_gives_zero_loss_connected_to_the_graph():
    """A rank with no b2 images in a step still calls the loss (distributed contract): 0, finite, backward works."""
    f1, f2, g = _maps(n=0)
    loss = TokenInfoNCE(gather=True)(f1, f2, g)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert _grads_finite(f1, f2)


def test_per_call_gather_switch():
    f1, f2, g = _maps(n=1)
    crit = TokenInfoNCE()  # gather="auto": off without a process group
    with pytest.raises(SERError, match="at least 2 images"):
        crit(f1, f2, g)
    with pytest.raises(SERError, match="at least 2 images"):
        TokenInfoNCE(gather=True)(f1, f2, g, gather=False)
    with pytest.raises(SERError, match="at least 2 images"):  # no process group: gather=True cannot help one image
        crit(f1, f2, g, gather=True)
    f1, f2, g = _maps(n=3)
    assert torch.allclose(TokenInfoNCE(gather=True)(f1, f2, g, gather=False), crit(f1, f2, g))


# ------------------------------------------------------------------ non-finite checks
def _named(f1, f2):
    return [("view 1", f1), ("view 2", f2)]


@pytest.mark.parametrize("value,kind", [(float("inf"), "+Inf"), (float("-inf"), "-Inf"), (float("nan"), "NaN")])
def test_nonfinite_map_is_named_with_its_kind(value, kind):
    f1, f2, g = _maps(n=3, dtype=torch.float32)
    f1 = f1.detach().clone()
    f1[1, 2, 0, 1] = value
    loss = TokenInfoNCE()(f1, f2, g)
    assert not torch.isfinite(loss)
    with pytest.raises(SERError) as e:
        raise_if_nonfinite(loss, _named(f1, f2), where="layer 3")
    msg = str(e.value)
    assert "view 1 (3, 6, 3, 3): 1 " + kind in msg and "layer 3" in msg, msg
    assert "view 2" not in msg and "tau" not in msg, msg


def test_nonfinite_pixels_are_named():
    x1 = torch.rand(2, 3, 8, 8)
    x1[0, 0, 0, 0] = float("inf")
    x1[1, 1, 2, 2] = float("-inf")
    f = torch.randn(2, 4, 2, 2)
    with pytest.raises(SERError, match=r"view 1 pixels.*\+Inf.*-Inf"):
        raise_if_nonfinite(torch.tensor(float("nan")), [("view 1 pixels", x1), ("view 1", f)], where="layer 2")


def test_finite_maps_nonfinite_loss_points_at_tau_or_remote_rank():
    f = torch.randn(2, 4, 2, 2)
    with pytest.raises(SERError, match="tau"):
        raise_if_nonfinite(torch.tensor(float("inf")), _named(f, f))
    remote = torch.tensor([True, False, True])
    with pytest.raises(SERError) as e:
        raise_if_nonfinite(torch.tensor(float("nan")), _named(f, f), remote=remote)
    assert "rank 1" in str(e.value) and "tau" not in str(e.value)


def test_sync_check_reads_the_host_once_and_deferred_check_never():
    f1, f2, g = _maps(n=3, dtype=torch.float32)
    loss = TokenInfoNCE()(f1, f2, g)
    with count_syncs() as c:
        raise_if_nonfinite(loss, _named(f1, f2), where="layer 3")
    assert c.total == 1, c.report()
    check = FiniteCheck(mode="deferred")
    with count_syncs() as c:
        for _ in range(3):
            check(loss, _named(f1, f2), where="layer 3")
    assert c.total == 0, c.report()
    check.flush()


def test_deferred_check_reports_the_bad_step_on_the_next_call():
    f1, f2, g = _maps(n=3, dtype=torch.float32)
    good = TokenInfoNCE()(f1, f2, g)
    bad1 = f1.detach().clone()
    bad1[0, 0, 0, 0] = float("nan")
    bad = TokenInfoNCE()(bad1, f2, g)
    check = FiniteCheck(mode="deferred")
    check(good, _named(f1, f2), where="layer 3")
    check(bad, _named(bad1, f2), where="layer 3")  # step 1 is bad: not raised yet (no host read)
    with pytest.raises(SERError, match=r"step 1.*view 1.*NaN"):
        check(good, _named(f1, f2), where="layer 3")
    check2 = FiniteCheck(mode="deferred")
    check2(bad, _named(bad1, f2))
    with pytest.raises(SERError, match="NaN"):
        check2.flush()
    sync = FiniteCheck(mode="sync")
    with pytest.raises(SERError, match="view 1"):
        sync(bad, _named(bad1, f2))
    auto = FiniteCheck()  # "auto" on CPU tensors: immediate (a host read costs nothing there)
    with pytest.raises(SERError, match="step 0.*view 1"):
        auto(bad, _named(bad1, f2))
    with pytest.raises(SERError, match="mode"):
        FiniteCheck(mode="later")


# ------------------------------------------------------------------ zero host syncs in forward + backward
_CONFIGS = [
    {},
    {"max_negatives": 7},
    {"symmetric": False},
    {"same_branch_negatives": True},
    {"gather": True},
    {"tau": 0.01},  # unfused path (2/tau too large for the shifted exp)
    {"scale_frame": "view1"},
]


@pytest.mark.parametrize("kw", _CONFIGS, ids=[str(k) for k in _CONFIGS])
@pytest.mark.parametrize("variant", ["online", "keys", "head"])
def test_loss_forward_backward_makes_no_host_sync(kw, variant):
    """The loss's own code reads nothing back to the host (the group action ρ is counted by the views' tests)."""
    f1, f2, g = _maps(n=4, c=8, h=3, w=3, h2=4, w2=4, dtype=torch.float32)
    head = TokenHead(8, 8, 8) if variant == "head" else None
    keys = (f1.detach() * 1.1, f2.detach() * 0.9) if variant == "keys" else None
    crit = TokenInfoNCE(**kw)
    torch.manual_seed(0)
    with count_syncs() as c:
        crit(f1, f2, g, keys=keys, head=head).backward()
    mine = [(op, where) for op, where in c.events if not where.startswith("group.py")]
    assert not mine, c.report()


# ------------------------------------------------------------------ scale_frame="view1" (the authors' frame)
def _naive_direction(q, k, tau):
    """Dense reference for one direction: q, k (n, T, C); positive k[i, t]; negatives all tokens of other images."""
    n, t, c = q.shape
    qn, kn = F.normalize(q, dim=-1).reshape(n * t, c), F.normalize(k, dim=-1).reshape(n * t, c)
    s = qn @ kn.t() / tau
    img = torch.arange(n).repeat_interleave(t)
    pos = s.diagonal()
    neg = s.masked_fill(img[:, None] == img[None, :], float("-inf"))
    return (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()


def _naive_view1_frame(f1, f2, g, tau, mode="bilinear"):
    """Written from the description: direction 1 as always (view 2's grid, view 1 moved there by ρ_g);
    direction 2 on view 1's own grid, its keys view 2's map moved into view 1's frame by ρ of g⁻¹."""
    seq = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731
    z1a = rho(f1, g, size=tuple(f2.shape[-2:]), mode=mode)
    z2b = rho(f2, g.inverse(), size=tuple(f1.shape[-2:]), mode=mode)
    return 0.5 * (_naive_direction(seq(f2), seq(z1a), tau) + _naive_direction(seq(f1), seq(z2b), tau))


def _scaled_maps(seed=0, n=3):
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, 5, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(n, 5, 6, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    rot, flip = torch.tensor([1, 3, 2, 1])[:n], torch.tensor([0, 0, 1, 1])[:n]  # quarter turns: g⁻¹ ≠ g
    return f1, f2, GroupElement.from_d4(rot, flip, scale=(1.5, 1.5))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_view1_frame_matches_naive_port_under_scale(mode):
    f1, f2, g = _scaled_maps()
    got = TokenInfoNCE(tau=0.4, scale_frame="view1", interpolation=mode)(f1, f2, g)
    gg = torch.autograd.grad(got, (f1, f2))
    want = _naive_view1_frame(f1, f2, g, 0.4, mode)
    gw = torch.autograd.grad(want, (f1, f2))
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)  # the loss computes in fp32
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(gg, gw))
    default = TokenInfoNCE(tau=0.4, interpolation=mode)(f1, f2, g)
    assert not torch.allclose(default, got, atol=1e-4), "under scale the two frames must differ"


def test_view1_frame_with_teacher_keys_matches_naive_port():
    f1, f2, g = _scaled_maps(seed=1)
    k1, k2 = f1.detach() * 0.7 + 0.1, f2.detach() * 1.3 - 0.2
    got = TokenInfoNCE(scale_frame="view1")(f1, f2, g, keys=(k1, k2))
    seq = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731
    want = 0.5 * (
        _naive_direction(seq(f2), seq(rho(k1, g, size=(6, 6))), 0.4)
        + _naive_direction(seq(f1), seq(rho(k2, g.inverse(), size=(4, 4))), 0.4)
    )
    assert torch.allclose(got.double(), want, atol=1e-5), (got, want)


@pytest.mark.parametrize("grid", [(3, 3, 3, 3), (3, 5, 5, 3)])
def test_view1_frame_equals_default_for_d4(grid):
    """D4 only: ρ is a permutation, so both frames pair the same tokens and give the same loss and gradient."""
    h1, w1, h2, w2 = grid
    gen = torch.Generator().manual_seed(2)
    n = 4
    f1 = torch.randn(n, 5, h1, w1, generator=gen, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(n, 5, h2, w2, generator=gen, dtype=torch.float64, requires_grad=True)
    rot = torch.randint(0, 4, (n,), generator=gen)
    if h1 != h2:
        rot = rot | 1  # a non-square grid turned into its transpose: odd rotations only
    g = GroupElement.from_d4(rot, torch.randint(0, 2, (n,), generator=gen))
    a = TokenInfoNCE(scale_frame="view1")(f1, f2, g)
    ga = torch.autograd.grad(a, (f1, f2))
    b = TokenInfoNCE(scale_frame="view2")(f1, f2, g)
    gb = torch.autograd.grad(b, (f1, f2))
    assert torch.allclose(a, b, atol=1e-6) and all(torch.allclose(x, y, atol=1e-7) for x, y in zip(ga, gb))


def test_scale_frame_is_validated():
    with pytest.raises(SERError, match="scale_frame"):
        TokenInfoNCE(scale_frame="view3")


# ------------------------------------------------------------------ online vs stop-gradient keys
def test_online_keys_give_about_twice_the_gradient_of_stop_grad_keys():
    """Same λ, same views, teacher = a copy of the online encoder (a momentum encoder at its start): with online
    keys the gradient flows through both sides of every similarity, so it is ≈ 2× the stop-gradient one (cosine
    ≈ 1). Exactly 2× only when row and column softmaxes agree; at τ = 0.4 the measured ratio is ≈ 1.9."""
    from dist_helpers.common import LAYER, make_images, make_pair, make_vit

    vit = make_vit(0)
    teacher = copy.deepcopy(vit)
    pair = make_pair(make_images(8, seed=3), seed=4)

    def maps(m):
        out = m.forward_intermediates(torch.cat([pair.x1, pair.x2]), indices=[LAYER - 1], output_fmt="NCHW", intermediates_only=True)[0]
        return out[:8], out[8:]

    crit = TokenInfoNCE(tau=0.4)
    params = [p for p in vit.parameters()]
    on = torch.autograd.grad(crit(*maps(vit), pair.relative), params, allow_unused=True)
    with torch.no_grad():
        keys = maps(teacher)
    sg = torch.autograd.grad(crit(*maps(vit), pair.relative, keys=keys), params, allow_unused=True)
    a = torch.cat([g.flatten() for g in on if g is not None])
    b = torch.cat([g.flatten() for g in sg if g is not None])
    ratio, cos = (a.norm() / b.norm()).item(), F.cosine_similarity(a, b, 0).item()
    assert 1.8 < ratio < 2.05 and cos > 0.99, (ratio, cos)
    assert math.isfinite(ratio)


def test_extra_device_checks_share_the_one_host_read():
    """The caller's device-side checks (e.g. pairing) ride along: one read for all in sync mode, none deferred;
    the value is checked first; value=None checks only the extras."""
    f1, f2, g = _maps(n=3, dtype=torch.float32)
    loss = TokenInfoNCE()(f1, f2, g)
    ok, bad = torch.tensor(True), torch.tensor(False)
    with count_syncs() as c:
        raise_if_nonfinite(loss, _named(f1, f2), extra=[(ok, "never"), (ok, "never")])
    assert c.total == 1, c.report()
    with pytest.raises(SERError, match="pairing is off"):
        raise_if_nonfinite(loss, _named(f1, f2), extra=[(ok, "never"), (bad, "pairing is off")])
    with pytest.raises(SERError, match="pairing is off"):
        raise_if_nonfinite(None, [], extra=[(bad, "pairing is off")])
    raise_if_nonfinite(None, [])  # nothing to check: no read, no error
    nan = torch.tensor(float("nan"))
    with pytest.raises(SERError, match="tau"):  # the value first
        raise_if_nonfinite(nan, _named(f1, f2), extra=[(bad, "pairing is off")])
    check = FiniteCheck(mode="deferred")
    with count_syncs() as c:
        check(loss, _named(f1, f2), where="layer 3", extra=[(bad, "pairing is off")])
    assert c.total == 0, c.report()
    with pytest.raises(SERError, match="pairing is off"):
        check.flush()
    check(None, [], extra=[(ok, "never")])
    check.flush()
