"""Bad input, fuzzed with hypothesis: every failure is an SERError with a message, never an error from deep
inside torch/kornia/timm, and never a silently wrong (non-finite) loss; NaN/Inf in the features is reported.

Each property runs a bounded number of examples (derandomized by the conftest profile) on a tiny ViT.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers.common import LAYER, make_images, make_pair, make_vit  # noqa: E402

from ser_plugin import EquivariantViews, GroupElement, SERError, TokenInfoNCE, ViewPair, attach_ser, rho  # noqa: E402

FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=120)

_VIT = {}


def _vit(dynamic: bool):
    if dynamic not in _VIT:
        _VIT[dynamic] = make_vit(0, dynamic=dynamic)
    return _VIT[dynamic]


def _useful(e: SERError) -> None:
    msg = str(e)
    assert len(msg) > 25, f"SERError message too short to be useful: {msg!r}"


weird = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 10), st.just("x"), st.none(), st.booleans(), st.just([1, 2])
)
ATTACH_ARGS = {
    "lam": weird,
    "tau": weird,
    "max_negatives": weird,
    "scale": st.one_of(st.none(), st.tuples(weird, weird), st.lists(st.floats(0.01, 5), max_size=3).map(tuple), st.just("big")),
    "photometric": st.sampled_from(["mocov3", None, "foo", 3, (None, None)]),
    "mean": st.one_of(st.none(), st.lists(st.floats(0, 1), max_size=4), st.just("abc")),
    "std": st.one_of(st.none(), st.lists(st.floats(0.1, 1), max_size=4), st.just(0.5)),
    "patch_size": st.one_of(st.none(), st.integers(-2, 20), st.just(2.5)),
    "num_prefix_tokens": st.one_of(st.none(), st.integers(-2, 5)),
    "blocks": st.sampled_from([None, "blocks", "nope", "patch_embed", "blocks.0", 3, [], "blocks.0.attn"]),
    "head": st.sampled_from([False, True]),
    "interpolation": st.sampled_from(["bilinear", "bicubic", "cubic", 1, "nearest"]),
    "late_cls": st.booleans(),
    "same_branch_negatives": st.booleans(),
    "gather": st.sampled_from(["auto", False]),
    "rotations": st.booleans(),
    "flips": st.booleans(),
    "symmetric": st.booleans(),
}
attach_kwargs = st.lists(st.sampled_from(sorted(ATTACH_ARGS)), max_size=3, unique=True).flatmap(
    lambda ks: st.fixed_dictionaries({k: ATTACH_ARGS[k] for k in ks})
)


@FUZZ
@given(
    layer=st.one_of(st.integers(-5, 5), st.floats(), st.none(), st.just("2")),
    kwargs=attach_kwargs,
    dynamic=st.booleans(),
    n=st.integers(0, 4),
    side=st.sampled_from([16, 12, 8, 15]),
)
def test_attach_and_step_fuzz(layer, kwargs, dynamic, n, side):
    """attach_ser with 1-3 odd arguments, then views -> capture -> loss -> backward on n images."""
    vit = _vit(dynamic)
    if not dynamic:
        side = 16  # a fixed-size ViT refuses other sizes itself: the host model's own check, not SER's
    ser = None
    try:
        ser = attach_ser(vit, layer, **kwargs)
        pair = ser.views(torch.rand(n, 3, side, side))
        if not (n == 0 and dynamic):  # timm's dynamic_img_size cannot run 0 images (a reshape of its own): skip the passes
            with ser.capture():
                vit(pair.x1), vit(pair.x2)
        loss = ser.loss(pair)
    except SERError as e:
        _useful(e)
        return
    finally:
        if ser is not None:
            ser.remove()
    assert torch.isfinite(loss), f"silently non-finite loss {loss} for layer={layer!r}, {kwargs}"
    loss.backward()


DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.uint8, torch.int64, torch.bool]


@FUZZ
@given(
    shape=st.lists(st.integers(0, 20), max_size=5),
    dtype=st.sampled_from(DTYPES),
    photometric=st.sampled_from(["mocov3", None]),
    scale=st.sampled_from([None, (0.5, 1.5), (0.01, 0.02), (5.0, 9.0)]),
    patch=st.integers(1, 8),
    rotations=st.booleans(),
)
def test_views_fuzz(shape, dtype, photometric, scale, patch, rotations):
    """Any shape and dtype: a correct ViewPair (patch-aligned, one element per image, dtype kept) or SERError."""
    x = (torch.rand(tuple(shape)) * 2).to(dtype)
    try:
        pair = EquivariantViews(patch_size=patch, photometric=photometric, scale=scale, rotations=rotations)(x)
    except SERError as e:
        _useful(e)
        return
    for xi, gi in ((pair.x1, pair.g1), (pair.x2, pair.g2)):
        assert xi.shape[:2] == x.shape[:2] and len(gi) == x.shape[0]
        assert xi.shape[-2] % patch == 0 and xi.shape[-1] % patch == 0
        assert xi.dtype == x.dtype


@FUZZ
@given(
    n=st.integers(0, 4),
    c=st.integers(0, 6),
    grid1=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    grid2=st.tuples(st.integers(0, 4), st.integers(0, 4)),
    n_elems=st.integers(0, 5),
    dtype=st.sampled_from(DTYPES),
    rot=st.integers(-2, 6),
    scale=st.sampled_from([None, (2.0, 2.0), (0.5, 1.0)]),
    tau=st.sampled_from([0.4, 0.05]),
    max_negatives=st.sampled_from([None, 1, 3, 1000]),
    same_branch=st.booleans(),
    keys=st.sampled_from([None, "same", "wrong_grid", "wrong_n", "not_tensors"]),
)
def test_token_loss_fuzz(n, c, grid1, grid2, n_elems, dtype, rot, scale, tau, max_negatives, same_branch, keys):
    """TokenInfoNCE on arbitrary maps/elements/keys: a finite loss or SERError."""
    f1 = (torch.randn((n, c) + grid1) * 3).to(dtype)
    f2 = (torch.randn((n, c) + grid2) * 3).to(dtype)
    g = GroupElement.from_d4([rot] * n_elems, [rot % 2] * n_elems, scale=scale)
    k = {
        None: None,
        "same": (f1.clone(), f2.clone()),
        "wrong_grid": (f1.clone(), f2[..., :1, :].clone()),
        "wrong_n": (f1[:1].clone(), f2[:1].clone()),
        "not_tensors": ("a", "b"),
    }[keys]
    try:
        loss = TokenInfoNCE(tau, max_negatives=max_negatives, same_branch_negatives=same_branch)(f1, f2, g, keys=k)
    except SERError as e:
        _useful(e)
        return
    assert loss.dim() == 0 and torch.isfinite(loss), (loss, f1.shape, f2.shape, len(g))


@FUZZ
@given(
    rot=st.one_of(st.lists(st.integers(-9, 9), max_size=4), st.just("ab"), st.just([[1, 2], [3]]), st.just([1.5, 2.0])),
    flip=st.one_of(st.lists(st.booleans(), max_size=4), st.just("ab"), st.just([2, 3])),
    scale=st.one_of(st.none(), st.tuples(st.sampled_from([-1.0, 0.0, 0.5, 2.0, float("nan"), float("inf")]), st.sampled_from([1.0, 0.5, float("nan")])), st.just((1.0, 2.0, 3.0))),
    grid=st.tuples(st.integers(1, 4), st.integers(1, 4)),
)
def test_group_elements_fuzz(rot, flip, scale, grid):
    """Elements from odd inputs, acting on a map: an element that round-trips, or SERError."""
    try:
        g = GroupElement.from_d4(rot, flip, scale=scale)
        x = torch.randn(len(g), 2, *grid)
        y = rho(x, g)
    except SERError as e:
        _useful(e)
        return
    assert y.shape[:2] == x.shape[:2]
    if not g.has_scale():
        assert torch.equal(rho(y, g.inverse()), x)


@pytest.fixture
def handle():
    vit = make_vit(0)
    ser = attach_ser(vit, LAYER, photometric=None)
    yield vit, ser
    ser.remove()


@settings(deadline=None, suppress_health_check=list(HealthCheck), max_examples=60)
@given(
    n_caps=st.integers(0, 3),
    pair_n=st.sampled_from([4, 4, 4, 0, 1, 5]),
    where=st.sampled_from(["none", "none", "view 1", "view 2", "both", "key"]),
    what=st.sampled_from([float("nan"), float("inf"), -float("inf")]),
)
def test_handle_loss_fuzz(handle, n_caps, pair_n, where, what):
    """ser.loss with the wrong number/order of captures, a mismatched pair, or NaN/Inf in maps or teacher keys:
    SERError naming the problem; a finite loss only when everything is right."""
    vit, ser = handle
    x = make_images(4, seed=1)
    pair = make_pair(x, seed=2)
    xs = [pair.x1, pair.x2, pair.x1][:n_caps]
    with ser.capture():
        for xi in xs:
            vit(xi)
    if where in ("view 1", "both") and ser._captures:
        ser._captures[0] = ser._captures[0].clone().index_fill(0, torch.tensor([0]), what)
    if where in ("view 2", "both") and len(ser._captures) > 1:
        ser._captures[1] = ser._captures[1].clone().index_fill(0, torch.tensor([0]), what)
    keys = None
    if where == "key":
        with torch.no_grad():
            keys = (ser.encode(pair.x1).index_fill(0, torch.tensor([0]), what), ser.encode(pair.x2))
    p = pair if pair_n == 4 else ViewPair(
        make_images(pair_n, 3), make_images(pair_n, 4), GroupElement.identity(pair_n), GroupElement.identity(pair_n)
    )
    try:
        loss = ser.loss(p, keys=keys)
    except SERError as e:
        _useful(e)
        if where == "key" and n_caps == 2 and pair_n == 4:
            assert "key" in str(e), f"NaN in the teacher keys must be named: {e}"
        elif where != "none" and n_caps == 2 and pair_n == 4:
            assert "non-finite" in str(e) and "view" in str(e), f"NaN/Inf in the maps must be reported as such: {e}"
        return
    finally:
        ser.clear()
    # an empty pair with nothing captured is a rank without b2 images that skipped its passes: an exact zero
    empty = n_caps == 0 and pair_n == 0
    assert where == "none" and (n_caps in (1, 2) and pair_n == 4 or empty), f"accepted bad input: caps={n_caps}, pair_n={pair_n}, {where}"
    assert torch.isfinite(loss) and (not empty or loss.item() == 0.0)


def test_nan_in_features_is_reported_not_propagated(handle):
    vit, ser = handle
    pair = make_pair(make_images(4, seed=1), seed=2)
    x1 = pair.x1.clone()
    x1[1, 0, 3, 3] = float("nan")
    with ser.capture():
        vit(x1), vit(pair.x2)
    with pytest.raises(SERError, match=r"non-finite values \(NaN/Inf\) in the view 1"):
        ser.loss(pair)
    assert ser.captures == [], "a failed loss must not leave captures for the next step"


@pytest.mark.parametrize("where", ["view 1", "view 2", "both", "teacher key 1"])
@pytest.mark.parametrize("what", [float("nan"), float("inf")])
def test_nonfinite_features_are_named(handle, where, what):
    """NaN/Inf in either view's map or in a teacher key: SERError naming where, never a NaN loss."""
    vit, ser = handle
    pair = make_pair(make_images(4, seed=1), seed=2)
    with torch.no_grad():
        keys = [ser.encode(pair.x1), ser.encode(pair.x2)]
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    bad = lambda t: t.clone().index_fill(0, torch.tensor([1]), what)  # noqa: E731
    if where in ("view 1", "both"):
        ser._captures[0] = bad(ser._captures[0])
    if where in ("view 2", "both"):
        ser._captures[1] = bad(ser._captures[1])
    if where == "teacher key 1":
        keys[0] = bad(keys[0])
    with pytest.raises(SERError, match="non-finite") as info:
        ser.loss(pair, keys=tuple(keys))
    for name in ("view 1", "view 2") if where == "both" else (where,):
        assert name in str(info.value), str(info.value)


@pytest.mark.parametrize("arg", ["lam", "tau"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, "1"])
def test_nonfinite_or_negative_weights_refused(arg, value):
    with pytest.raises(SERError, match=arg):
        attach_ser(make_vit(0), LAYER, **{arg: value})


def test_views_captured_in_swapped_order_are_refused(handle):
    """model(x2) before model(x1) gives same-shaped maps and a finite but wrong loss: it must be refused."""
    vit, ser = handle
    pair = make_pair(make_images(4, seed=1), seed=2)
    with ser.capture():
        vit(pair.x1), vit(pair.x2)
    right = ser.loss(pair)
    with ser.capture():
        vit(pair.x2), vit(pair.x1)
    with pytest.raises(SERError, match="view 2 then view 1"):
        ser.loss(pair)
    with ser.capture():
        vit(torch.cat([pair.x1, pair.x2]))
    assert torch.allclose(ser.loss(pair), right, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ser.forward_loss(pair), right, rtol=1e-5, atol=1e-6)
