"""L_equiv against a naive reference, closed forms, chunking, symmetry, gradients and a known-equivariant model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_timm
from einops import reduce
from torch import nn

from ser_plugin import GroupElement, SERError, TokenHead, TokenInfoNCE, attach_ser, equivariance_score, rho
from ser_plugin.loss import negative_logsumexp


def naive_direction(q, k, tau, extra=None):
    """Loops over every query: positive k[i, t], negatives every token of every other image (keys, then extra)."""
    n, t, _ = q.shape
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    extra = F.normalize(extra, dim=-1) if extra is not None else None
    losses = []
    for i in range(n):
        for a in range(t):
            logits = [q[i, a] @ k[i, a] / tau]
            for j in range(n):
                if j == i:
                    continue
                for b in range(k.shape[1]):
                    logits.append(q[i, a] @ k[j, b] / tau)
                if extra is not None:
                    for b in range(extra.shape[1]):
                        logits.append(q[i, a] @ extra[j, b] / tau)
            logits = torch.stack(logits)
            losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses).mean()


def naive_loss(f1, f2, g, tau, symmetric=True, same_branch=False):
    z1a = rho(f1, g, size=tuple(f2.shape[-2:]))
    seq = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731
    a = naive_direction(seq(f2), seq(z1a), tau, seq(f2) if same_branch else None)
    if not symmetric:
        return a
    b = naive_direction(seq(z1a), seq(f2), tau, seq(z1a) if same_branch else None)
    return 0.5 * (a + b)


def _maps(n=3, c=5, h=3, w=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    f1 = torch.randn(n, c, h, w, generator=gen, dtype=dtype, requires_grad=True)
    f2 = torch.randn(n, c, h, w, generator=gen, dtype=dtype, requires_grad=True)
    g = GroupElement.from_d4(torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen))
    return f1, f2, g


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("same_branch", [False, True])
@pytest.mark.parametrize("tau", [0.1, 0.4])
def test_matches_naive_reference_value_and_grad(symmetric, same_branch, tau):
    f1, f2, g = _maps()
    ours = TokenInfoNCE(tau, symmetric=symmetric, same_branch_negatives=same_branch)(f1, f2, g)
    ref = naive_loss(f1, f2, g, tau, symmetric, same_branch)
    assert torch.allclose(ours.double(), ref, atol=1e-5, rtol=1e-5), (ours.item(), ref.item())
    go = torch.autograd.grad(ours, (f1, f2))
    gr = torch.autograd.grad(ref, (f1, f2))
    for a, b in zip(go, gr):
        assert torch.allclose(a.double(), b, atol=1e-5, rtol=1e-4)


def test_matches_naive_with_scale_and_nonsquare_grid():
    gen = torch.Generator().manual_seed(3)
    f1 = torch.randn(3, 4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    f2 = torch.randn(3, 4, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    g = GroupElement.from_d4([0, 1, 3], [1, 0, 1])
    ours = TokenInfoNCE(0.3)(f1, f2, g)
    ref = naive_loss(f1, f2, g, 0.3)
    assert torch.allclose(ours.double(), ref, atol=1e-5)


def test_closed_form_two_orthogonal_tokens():
    """Two images of one token each, q = k = e_i: every query's loss is log(1 + exp(-1/τ))."""
    tau = 0.25
    e = torch.eye(2).view(2, 2, 1, 1)
    loss = TokenInfoNCE(tau)(e, e.clone(), GroupElement.identity(2))
    assert math.isclose(loss.item(), math.log1p(math.exp(-1 / tau)), rel_tol=1e-6)


def test_closed_form_identical_images_is_log_of_count():
    """All tokens equal: every logit is 1/τ, so the loss is log(1 + #negatives) = log(1 + (n-1)·T)."""
    n, t = 4, 9
    f = torch.ones(n, 3, 3, 3)
    loss = TokenInfoNCE(0.5)(f, f.clone(), GroupElement.random(n))
    assert math.isclose(loss.item(), math.log(1 + (n - 1) * t), rel_tol=1e-6)


@pytest.mark.parametrize("chunk", [1, 7, 50, 10**9])
def test_chunked_equals_unchunked(chunk):
    f1, f2, g = _maps(n=4, c=6, h=4, w=4, seed=5, dtype=torch.float32)
    big = TokenInfoNCE(0.4, chunk_elements=10**9)(f1, f2, g)
    small = TokenInfoNCE(0.4, chunk_elements=chunk)(f1, f2, g)
    assert torch.allclose(big, small, atol=1e-6)
    gb = torch.autograd.grad(big, (f1, f2))
    gs = torch.autograd.grad(small, (f1, f2))
    for a, b in zip(gb, gs):
        assert torch.allclose(a, b, atol=1e-6)


def test_symmetry_swapping_views():
    """L(f1, f2, g) == L(f2, f1, g⁻¹): the symmetric loss does not care which view is 'first'."""
    f1, f2, g = _maps(n=3, c=4, h=4, w=4, seed=2, dtype=torch.float64)
    crit = TokenInfoNCE(0.3)
    assert torch.allclose(crit(f1, f2, g), crit(f2, f1, g.inverse()), atol=1e-10)


def test_gradcheck_negative_logsumexp():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(8, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    qid = torch.tensor([0, 0, 1, 1, 2, 2])
    kid = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    # the custom function computes in fp32 by design; compare its gradient with float64 autograd
    out = negative_logsumexp(q, k, qid, kid, 0.5, chunk_elements=5)
    sim = (q @ k.t() / 0.5).masked_fill(qid[:, None] == kid[None, :], float("-inf"))
    ref = torch.logsumexp(sim, 1)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    w = torch.randn(6, dtype=torch.float64)
    g1 = torch.autograd.grad((out.double() * w).sum(), (q, k))
    g2 = torch.autograd.grad((ref * w).sum(), (q, k))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5)


def test_max_negatives_bounds_pool_and_full_pool_is_exact():
    f1, f2, g = _maps(n=6, c=4, h=2, w=2, seed=1, dtype=torch.float32)
    full = TokenInfoNCE(0.4)(f1, f2, g)
    same = TokenInfoNCE(0.4, max_negatives=10**6)(f1, f2, g)
    assert torch.allclose(full, same)
    torch.manual_seed(0)
    sampled = TokenInfoNCE(0.4, max_negatives=5)(f1, f2, g)
    assert torch.isfinite(sampled) and sampled < full  # fewer negatives, smaller partition function


def test_head_is_applied_before_rho_and_gets_grads():
    f1, f2, g = _maps(n=3, c=8, h=2, w=2, seed=4, dtype=torch.float32)
    head = TokenHead(8, 16, 16)
    loss = TokenInfoNCE(0.4)(f1, f2, g, head=head)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())


def test_teacher_keys_send_no_gradient_to_teacher():
    f1, f2, g = _maps(n=3, c=4, h=2, w=2, seed=6, dtype=torch.float32)
    k1 = torch.randn(3, 4, 2, 2, requires_grad=True)
    k2 = torch.randn(3, 4, 2, 2, requires_grad=True)
    loss = TokenInfoNCE(0.4)(f1, f2, g, keys=(k1, k2))
    loss.backward()
    assert k1.grad is None and k2.grad is None and f1.grad is not None and f2.grad is not None


@pytest.mark.parametrize(
    "kwargs, match", [({"tau": 0.0}, "tau"), ({"tau": float("nan")}, "tau"), ({"max_negatives": 0}, "max_negatives"), ({"interpolation": "cubic"}, "interpolation")]
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(SERError, match=match):
        TokenInfoNCE(**kwargs)


def test_call_errors():
    crit = TokenInfoNCE()
    f = torch.randn(1, 4, 2, 2)
    with pytest.raises(SERError, match="at least 2 images"):
        crit(f, f, GroupElement.identity(1))
    with pytest.raises(SERError, match="one relative element per image"):
        crit(torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), GroupElement.identity(2))
    with pytest.raises(SERError, match="disagree"):
        crit(torch.randn(3, 4, 2, 2), torch.randn(3, 5, 2, 2), GroupElement.identity(3))


# ------------------------------------------------------------- through a real ViT
def test_gradients_reach_blocks_up_to_L_and_not_above():
    vit = tiny_timm(depth=4)
    ser = attach_ser(vit, layer=2, photometric=None)
    pair = ser.views(torch.rand(4, 3, 32, 32))
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    ser.loss(pair).backward()
    for i, blk in enumerate(vit.blocks):
        grads = [p.grad for p in blk.parameters()]
        if i < 2:
            assert all(gr is not None for gr in grads) and sum(gr.abs().sum() for gr in grads) > 0, f"block {i + 1} got no gradient"
        else:
            assert all(gr is None or gr.abs().sum() == 0 for gr in grads), f"block {i + 1} (above L) got gradient"
    assert vit.patch_embed.proj.weight.grad.abs().sum() > 0
    assert vit.norm.weight.grad is None or vit.norm.weight.grad.abs().sum() == 0


class PatchMeanViT(nn.Module):
    """A toy 'ViT' whose token map is exactly D4-equivariant: per-patch mean colour → token-wise MLP blocks.

    With ``pos=True`` a learned per-position embedding is added, which breaks equivariance.
    """

    def __init__(self, patch=4, grid=8, dim=16, depth=2, pos=False):
        super().__init__()
        self.patch_size = patch
        self.num_prefix_tokens = 0
        self.embed = nn.Linear(3, dim)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim)) if pos else None
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(dim, dim), nn.GELU()) for _ in range(depth)])

    def forward(self, x):
        t = reduce(x, "b c (h p1) (w p2) -> b (h w) c", "mean", p1=self.patch_size, p2=self.patch_size)
        t = self.embed(t)
        if self.pos is not None:
            t = t + self.pos
        for b in self.blocks:
            t = b(t)
        return t.mean(1)


def test_equivariant_model_scores_higher_and_has_lower_loss():
    x = torch.rand(8, 3, 32, 32)
    eq, neq = PatchMeanViT(pos=False), PatchMeanViT(pos=True)
    scores, losses = {}, {}
    for name, m in (("eq", eq), ("neq", neq)):
        scores[name] = equivariance_score(m, x, layers=2)[2]
        ser = attach_ser(m, layer=2, photometric=None, tau=0.2)
        torch.manual_seed(1)
        pair = ser.views(x)
        with ser.capture():
            m(pair.x1), m(pair.x2)
        losses[name] = ser.loss(pair).item()
        ser.remove()
    assert scores["eq"]["raw"] > 0.999 and scores["eq"]["centred"] > 0.999
    assert scores["neq"]["centred"] < scores["eq"]["centred"] - 0.05
    assert losses["eq"] < losses["neq"]
