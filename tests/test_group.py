"""Group laws of ρ_g and agreement of the image action with ρ_g, as hypothesis properties.

Each property is a plain function of an ``ops`` object (rho, compose, inverse, act_image). The hypothesis
tests assert it holds for ser_plugin's implementation; ``test_*_detects_broken`` runs the same function
on deliberately broken implementations and asserts it fails there — so none of these can pass vacuously.
"""

from __future__ import annotations

import pytest
import torch
from einops import rearrange, reduce
from hypothesis import given
from hypothesis import strategies as st

from ser_plugin import GroupElement, SERError, act_image, rho


# ---------------------------------------------------------------- implementations under test
class Ops:
    def rho(self, f, g, **kw):
        return rho(f, g, **kw)

    def act(self, x, g, **kw):
        return act_image(x, g, **kw)

    def compose(self, g, h):
        return g.compose(h)

    def inverse(self, g):
        return g.inverse()


def _per_sample(f, g, fn):
    return torch.stack([fn(f[i], int(g.rot[i]), bool(g.flip[i])) for i in range(len(g))])


class ClockwiseRho(Ops):
    """Broken: rotates clockwise."""

    def rho(self, f, g, **kw):
        return _per_sample(f, g, lambda t, k, fl: torch.rot90(t.flip(-1) if fl else t, -k, (-2, -1)))


class RollingRot(Ops):
    """Broken: every quarter turn also swaps the first two rows (an off-by-one permutation, not of order 4)."""

    def rho(self, f, g, **kw):
        def one(t, k, fl):
            t = t.flip(-1) if fl else t
            for _ in range(k):
                t = torch.rot90(t, 1, (-2, -1))
                t = torch.cat([t[..., 1:2, :], t[..., 0:1, :], t[..., 2:, :]], dim=-2)
            return t

        return _per_sample(f, g, one)


def _swap01(t):
    return torch.cat([t[..., 1:2], t[..., 0:1], t[..., 2:]], dim=-1)


class RollingFlip(Ops):
    """Broken: the flip also swaps the first two columns (not an involution)."""

    def rho(self, f, g, **kw):
        return _per_sample(f, g, lambda t, k, fl: torch.rot90(_swap01(t.flip(-1)) if fl else t, k, (-2, -1)))


class FlipIsRot180(Ops):
    """Broken: the 'flip' is a half turn (commutes with rotations)."""

    def rho(self, f, g, **kw):
        return _per_sample(f, g, lambda t, k, fl: torch.rot90(torch.rot90(t, 2, (-2, -1)) if fl else t, k, (-2, -1)))


class AlwaysFlip(Ops):
    """Broken: the identity flips."""

    def rho(self, f, g, **kw):
        return rho(f, g, **kw).flip(-1)


class UnsignedCompose(Ops):
    """Broken: composition ignores flip ∘ rot = rot⁻¹ ∘ flip."""

    def compose(self, g, h):
        return GroupElement(torch.remainder(g.rot + h.rot, 4), g.flip ^ h.flip, g.scale * h.scale)


class NegatingInverse(Ops):
    """Broken: inverse negates the rotation even for reflections."""

    def inverse(self, g):
        return GroupElement(torch.remainder(-g.rot, 4), g.flip.clone(), 1.0 / g.scale)


# ---------------------------------------------------------------- properties
def identity_law(ops, f, g, h):
    e = GroupElement.identity(f.shape[0])
    return torch.equal(ops.rho(f, e), f)


def composition_law(ops, f, g, h):
    return torch.equal(ops.rho(f, ops.compose(g, h)), ops.rho(ops.rho(f, h), g))


def inverse_law(ops, f, g, h):
    return torch.equal(ops.rho(ops.rho(f, g), ops.inverse(g)), f) and torch.equal(ops.rho(f, ops.compose(ops.inverse(g), g)), f)


def _const(f, k, fl):
    n = f.shape[0]
    return GroupElement.from_d4([k] * n, [fl] * n)


def rot4_law(ops, f, g, h):
    r = _const(f, 1, False)
    out = f
    for _ in range(4):
        out = ops.rho(out, r)
    return torch.equal(out, f)


def flip2_law(ops, f, g, h):
    fl = _const(f, 0, True)
    return torch.equal(ops.rho(ops.rho(f, fl), fl), f)


def flip_rot_law(ops, f, g, h):
    fl, r, r_inv = _const(f, 0, True), _const(f, 1, False), _const(f, 3, False)
    return torch.equal(ops.rho(ops.rho(f, r), fl), ops.rho(ops.rho(f, fl), r_inv))


def convention_law(ops, f, g, h):
    """ρ matches torch.rot90 (counter-clockwise) after a flip of the last axis, per sample."""
    ref = _per_sample(f, g, lambda t, k, fl: torch.rot90(t.flip(-1) if fl else t, k, (-2, -1)))
    return torch.equal(ops.rho(f, g), ref)


def patchify_mean(x, p):
    return reduce(x, "b c (h p1) (w p2) -> b c h w", "mean", p1=p, p2=p)


def patchify_rearrange(x, p):
    return rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p)


def image_token_agreement(ops, f, g, h, p=3):
    """Φ(g·x) == ρ_g(Φ(x)) for a per-patch mean Φ (any image) and a pure rearrangement Φ (patch-constant image)."""
    x = torch.repeat_interleave(torch.repeat_interleave(f, p, -2), p, -1)  # patch-constant image from f
    x_noise = x + torch.randn_like(x)  # arbitrary image
    ok_mean = torch.allclose(patchify_mean(ops.act(x_noise, g), p), ops.rho(patchify_mean(x_noise, p), g), atol=1e-5, rtol=0)
    ok_rearr = torch.equal(patchify_rearrange(ops.act(x, g), p), ops.rho(patchify_rearrange(x, p), g))
    return ok_mean and ok_rearr


LAWS = [identity_law, composition_law, inverse_law, rot4_law, flip2_law, flip_rot_law, convention_law, image_token_agreement]


# ---------------------------------------------------------------- strategies
@st.composite
def cases(draw, square=None):
    """A map f (n, c, h, w) and two element batches; non-square grids get one rotation parity per batch."""
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 3))
    h = draw(st.integers(1, 7))
    sq = draw(st.booleans()) if square is None else square
    w = h if sq else draw(st.integers(1, 7))
    f = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))))

    def elems():
        if h == w:
            rot = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        else:
            parity = draw(st.integers(0, 1))
            rot = [parity + 2 * b for b in draw(st.lists(st.integers(0, 1), min_size=n, max_size=n))]
        flip = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        return GroupElement.from_d4(rot, flip)

    g, h_ = elems(), elems()
    if h != w and bool((g.rot % 2 == 1)[0]):
        # g acts after h: on non-square grids it must see h's output shape, so give h even turns
        h_ = GroupElement.from_d4(h_.rot - (h_.rot % 2), h_.flip)
    return f, g, h_


LAW_IDS = [law.__name__ for law in LAWS]


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
@given(case=cases())
def test_law_holds(law, case):
    f, g, h = case
    assert law(Ops(), f, g, h), f"{law.__name__} failed for f{tuple(f.shape)}, g={g}, h={h}"


BROKEN = {
    identity_law: [AlwaysFlip()],
    composition_law: [UnsignedCompose(), RollingRot()],
    inverse_law: [NegatingInverse(), RollingFlip()],
    rot4_law: [RollingRot()],
    flip2_law: [RollingFlip()],
    flip_rot_law: [FlipIsRot180()],
    convention_law: [ClockwiseRho(), FlipIsRot180()],
    image_token_agreement: [ClockwiseRho()],
}


def _fixed_cases(k=12):
    out = []
    gen = torch.Generator().manual_seed(1)
    for i in range(k):
        n, s = 3, 3 + i % 3
        f = torch.randn(n, 2, s, s, generator=gen)
        g = GroupElement.from_d4(torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen))
        h = GroupElement.from_d4(torch.randint(0, 4, (n,), generator=gen), torch.randint(0, 2, (n,), generator=gen))
        out.append((f, g, h))
    return out


@pytest.mark.parametrize("law", LAWS, ids=LAW_IDS)
def test_law_detects_broken(law):
    """Every law fails on at least one deliberately broken implementation (so it is not vacuous)."""
    for broken in BROKEN[law]:
        assert not all(law(broken, *c) for c in _fixed_cases()), f"{law.__name__} did not catch {type(broken).__name__}"
        # the correct implementation passes the very same cases
        assert all(law(Ops(), *c) for c in _fixed_cases())


# ---------------------------------------------------------------- element algebra
@given(case=cases(square=True))
def test_algebra_laws(case):
    _, g, h = case
    e = GroupElement.identity(len(g))
    assert g.compose(e).equals(g) and e.compose(g).equals(g)
    assert g.compose(g.inverse()).is_identity() and g.inverse().compose(g).is_identity()
    k = GroupElement.from_d4(torch.randint(0, 4, (len(g),)), torch.randint(0, 2, (len(g),)))
    assert g.compose(h).compose(k).equals(g.compose(h.compose(k)))  # associativity
    r = GroupElement.from_d4([1] * len(g), [0] * len(g))
    assert r.compose(r).compose(r).compose(r).is_identity()


def test_scaled_algebra_matches_action_sizes():
    g = GroupElement.from_d4([1], [0], scale=(2.0, 3.0))
    x = torch.randn(1, 1, 4, 6)
    y = act_image(x, g, mode="nearest")
    assert y.shape[-2:] == (12, 12)  # rot: 6x4, then x(2, 3)
    back = act_image(y, g.inverse(), mode="area")
    assert torch.allclose(back, x, atol=1e-6)
    assert g.compose(g.inverse()).is_identity()


# ---------------------------------------------------------------- scale (approximate)
@given(
    k=st.integers(1, 4), h=st.integers(1, 6), w=st.integers(1, 6), rot=st.integers(0, 3), flip=st.booleans(), seed=st.integers(0, 999)
)
def test_scale_integer_roundtrip_exact(k, h, w, rot, flip, seed):
    """Up by an integer factor with nearest, back down with area: exactly the input (any D4 part too)."""
    f = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))
    g = GroupElement.from_d4([rot, rot], [flip, flip], scale=(float(k), float(k)))
    up = rho(f, g, mode="nearest")
    assert tuple(up.shape[-2:]) == (k * (w if rot % 2 else h), k * (h if rot % 2 else w))
    back = rho(up, g.inverse(), mode="area")
    assert torch.allclose(back, f, atol=1e-5, rtol=0)


@given(sy=st.floats(0.7, 1.3), sx=st.floats(0.7, 1.3), seed=st.integers(0, 999), mode=st.sampled_from(["bilinear", "bicubic"]))
def test_scale_roundtrip_bounded(sy, sx, seed, mode):
    """Non-integer factors: the round trip of a smooth map stays within 10% of its spread."""
    base = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(seed))
    f = torch.nn.functional.interpolate(base, size=(14, 14), mode="bicubic", align_corners=False)
    g = GroupElement.from_d4([0, 1], [False, True], scale=(sy, sx))
    moved = rho(f, g, mode=mode, size=(round(14 * sy), round(14 * sx)))
    back = rho(moved, g.inverse(), mode=mode, size=(14, 14))
    err = (back - f).abs().mean() / f.std()
    assert err < 0.10, f"round-trip error {err:.3f} of the spread at scale ({sy:.2f}, {sx:.2f})"


def test_scale_roundtrip_bound_detects_broken():
    """The bound above catches an inverse that only resamples back and forgets the D4 part."""
    base = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    f = torch.nn.functional.interpolate(base, size=(14, 14), mode="bicubic", align_corners=False)
    g = GroupElement.from_d4([0, 1], [False, True], scale=(0.8, 1.2))
    moved = rho(f, g, size=(11, 17))
    wrong_back = rho(moved, GroupElement.identity(2), size=(14, 14))
    assert (wrong_back - f).abs().mean() / f.std() >= 0.10


# ---------------------------------------------------------------- canon: shapes, errors, dtypes, devices, gradcheck
def test_nonsquare_mixed_parity_with_resample():
    f = torch.randn(4, 2, 3, 5)
    g = GroupElement.from_d4([0, 1, 2, 3], [0, 1, 0, 1])
    with pytest.raises(SERError):
        rho(f, g)  # mixed parities, no size to reconcile them
    out = rho(f, g, size=(4, 4))
    for i in range(4):
        one = rho(f[i : i + 1], g[i], size=(4, 4))
        assert torch.allclose(out[i], one[0], atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_preserved_and_exact(dtype):
    f = torch.randn(3, 2, 4, 4).to(dtype)
    g = GroupElement.from_d4([1, 2, 3], [1, 0, 1])
    out = rho(f, g)
    assert out.dtype == dtype
    assert torch.equal(rho(out, g.inverse()), f)


def test_gradcheck_float64():
    f = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = GroupElement.from_d4([1, 3], [True, False], scale=(1.5, 1.5))
    assert torch.autograd.gradcheck(lambda t: rho(t, g), (f,))
    assert torch.autograd.gradcheck(lambda t: rho(t, g.d4()), (f,))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: rho(torch.randn(2, 3, 4), GroupElement.identity(2)), r"\(B, C, H, W\)"),
        (lambda: rho(torch.randn(3, 1, 4, 4), GroupElement.identity(2)), "2 group elements for a batch of 3"),
        (lambda: rho(torch.randn(2, 1, 4, 4), GroupElement.identity(2), mode="lanczos"), "unknown resampling mode"),
        (lambda: GroupElement.from_d4([0, 1], [0]), "rot has 2 entries but flip has 1"),
        (lambda: GroupElement.from_d4([0], [0], scale=(0.0, 1.0)), "positive"),
        (lambda: GroupElement.identity(2).compose(GroupElement.identity(3)), "sizes 2 and 3"),
        (lambda: rho(torch.randn(2, 1, 4, 4), GroupElement.from_d4([0, 0], [0, 0], scale=torch.tensor([[1.0, 1.0], [2.0, 2.0]]))), "different sizes"),
    ],
)
def test_errors(bad, match):
    with pytest.raises(SERError, match=match):
        bad()


def test_batched_gather_matches_loop_large():
    """One gather for the whole batch equals per-sample torch.rot90/flip (no Python loop in the library)."""
    f = torch.randn(64, 8, 6, 6)
    g = GroupElement.random(64)
    assert convention_law(Ops(), f, g, g)



@pytest.mark.parametrize("size", [(8, 16), (20, 12), (12, 12)])
def test_square_grid_mixed_parity_with_scale_matches_per_sample_loop(size):
    """Square grids: the D4 permutation then one resample for the whole batch (no per-parity split, no host
    read) equals rot90/flip then interpolate, image by image (antialiased bilinear)."""
    x = torch.rand(8, 3, 12, 12)
    g = GroupElement.random(8, generator=torch.Generator().manual_seed(4))
    got = act_image(x, g, size=size)
    for i in range(8):
        k, f = int(g.rot[i]), bool(g.flip[i])
        ref = torch.rot90(x[i : i + 1].flip(-1) if f else x[i : i + 1], k, (-2, -1))
        ref = torch.nn.functional.interpolate(ref, size=size, mode="bilinear", align_corners=False, antialias=True) if size != (12, 12) else ref
        assert torch.allclose(got[i : i + 1], ref, atol=1e-6), (size, i)
