"""ρ_g on CNN maps (issue 18, part 2): the same analytic action as on token grids, and what holds exactly for a
CNN's strides and padding (docs/backbones.md, "Border and lattice effects").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ser_plugin import D4_ELEMENTS, GroupElement, act_image, rho
from ser_plugin.backbones import MapDescription, block_map
from ser_plugin.protocol import measure_equivariance

sizes = st.integers(min_value=1, max_value=9)
d4 = st.sampled_from(D4_ELEMENTS)


def _g(k, f, n):
    return GroupElement.from_d4([k] * n, [bool(f)] * n)


@settings(max_examples=30)
@given(h=sizes, c=st.integers(1, 5), e=d4, seed=st.integers(0, 2**16))
def test_rho_on_nchw_and_permuted_nhwc_maps_is_the_token_grid_action(h, c, e, seed):
    """Even and odd sides: ρ_g of a CNN map equals ρ_g of the same cells laid out as (B, N, C) tokens and reshaped,
    equals the image action on the map, and a non-contiguous NHWC view (what a Swin stage gives) acts the same."""
    gen = torch.Generator().manual_seed(seed)
    fmap = torch.randn(2, c, h, h, generator=gen)
    g = _g(*e, 2)
    tokens = fmap.flatten(2).transpose(1, 2)  # (B, N, C), the ViT layout of the same cells
    desc_tok = MapDescription((), None, None, 0, None, None, True)
    from ser_plugin.capture import tokens_to_map

    as_tokens = tokens_to_map(tokens, (h, h), (1, 1), 0, 1)[0]
    assert torch.equal(rho(as_tokens, g), rho(fmap, g))
    assert torch.equal(rho(fmap, g), act_image(fmap, g))
    nhwc = fmap.permute(0, 2, 3, 1).contiguous()
    view = block_map(nhwc, (h, h), MapDescription((), None, (1, 1), 0, None, None, True, layout="NHWC"), 0, 1)
    assert view.data_ptr() == nhwc.data_ptr()  # a view, no copy
    assert torch.equal(rho(view, g), rho(fmap, g))
    assert torch.equal(block_map(fmap, (h, h), desc_tok, 0, 1), fmap)


@settings(max_examples=20)
@given(h=st.integers(2, 9), s=st.sampled_from([0.5, 0.75, 1.5, 2.0]), seed=st.integers(0, 2**16))
def test_rho_scale_on_nhwc_view_equals_contiguous(h, s, seed):
    fmap = torch.randn(1, 3, h, h, generator=torch.Generator().manual_seed(seed))
    view = fmap.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    size = (max(1, round(h * s)),) * 2
    g = GroupElement.from_d4([1], [True], scale=(size[0] / h, size[1] / h))
    assert torch.allclose(rho(view, g, size=size), rho(fmap, g, size=size), atol=1e-6)


class Pointwise(nn.Module):
    """Equivariant by construction: 1x1 convolutions and 2x2 average pooling (stride 2, no padding), whose
    sampling lattice every D4 element maps onto itself (k - 2p = s, see docs/backbones.md)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU()),
            nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(16, 16, 1), nn.GELU()),
            nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(16, 8, 1)),
        )

    def forward(self, x):
        return self.stages(x).mean((2, 3))


@settings(max_examples=20)
@given(e=d4, side=st.sampled_from([4, 8, 12, 20]), seed=st.integers(0, 2**16))
def test_pointwise_network_is_exactly_equivariant_on_even_and_odd_maps(e, side, seed):
    """Maps of odd side too (20 px → 5x5 at stride 4): F_L(g·x) = ρ_g(F_L(x)) up to float error."""
    torch.manual_seed(seed % 1000)
    net = Pointwise().eval()
    x = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(seed))
    g = _g(*e, 2)
    with torch.no_grad():
        for k in range(1, 4):
            f = net.stages[:k]
            assert torch.allclose(f(act_image(x, g)), rho(f(x), g), atol=1e-5)


def test_pointwise_network_measures_zero_under_the_protocol():
    """measure_equivariance on a network equivariant by construction (through blocks=): ≈ 0 at every layer for
    every D4 element, while the permutation control is far from 0."""
    net = Pointwise()
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    res = measure_equivariance(net, x, scales=(), controls=("identity", "permutation"), blocks="stages")
    assert res.blocks == [1, 2, 3]
    for name in ("rot90", "rot180", "rot270", "flip", "flip_rot90", "flip_rot180", "flip_rot270"):
        if name in res.errors:
            assert max(res.errors[name]["one_minus_cos"]) < 1e-6, (name, res.errors[name])
    assert len(res.errors) >= 7
    assert min(res.controls["permutation"]["one_minus_cos"]) > 1e-4  # >= 100x the D4 errors at every layer


def _sym_kernel(k, cin, cout, seed):
    """A D4-symmetric kernel: the average of a random kernel over the eight D4 elements."""
    w = torch.randn(cout, cin, k, k, generator=torch.Generator().manual_seed(seed))
    return sum(act_image(w, _g(r, f, cout)) for r, f in D4_ELEMENTS) / 8


@pytest.mark.parametrize("k,p,exact", [(2, 0, True), (4, 1, True), (3, 1, False), (1, 0, False), (7, 3, False)])
def test_stride2_lattice_rule(k, p, exact):
    """A stride-2 convolution with a D4-symmetric kernel is exactly flip-equivariant iff k - 2p = 2 (the flip maps
    its sampling lattice onto itself). Otherwise (ResNet's 3x3/p1, 7x7/p3 and 1x1 stride-2 layers: k - 2p = 1)
    exactly this holds: F(flip x) = flip(G(x)), where G is the same convolution sampled on a lattice shifted by
    d = s - k + 2p pixels of the zero-padded image: G(x)[j] = sum_k w[k] pad_p(x)[s*j + d + k]."""
    w = _sym_kernel(k, 2, 3, seed=k)
    x = torch.randn(1, 2, 12, 12, generator=torch.Generator().manual_seed(1))

    def conv(t):
        return F.conv2d(t, w, stride=2, padding=p)

    flipped = conv(x.flip(-1))
    if exact:
        assert torch.allclose(flipped, conv(x).flip(-1), atol=1e-5)
        return
    assert not torch.allclose(flipped, conv(x).flip(-1), atol=1e-3)
    d = 2 - k + 2 * p
    padded = F.pad(x, (p, p + d, p, p))  # zero padding as the layer has it (plus d zeros to keep the width)
    shifted_lattice = F.conv2d(padded[..., d:], w, stride=2)
    assert shifted_lattice.shape == flipped.shape
    assert torch.allclose(flipped, shifted_lattice.flip(-1), atol=1e-5)


def test_protocol_accepts_timm_cnns_each_layer_at_its_stride():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    res = measure_equivariance(net, x, scales=(0.5,), controls=("identity", "permutation"))
    assert res.blocks == [1, 2, 3, 4, 5]
    assert all(v < 1e-6 for v in res.controls["identity"]["one_minus_cos"])
    assert all(0 < v < 2 for v in res.errors["rot90"]["one_minus_cos"])
    assert res.effective_scale["scale0.5"] == 0.5
    from ser_plugin import equivariance_score

    sc = equivariance_score(net, x, layers=[2, 5])
    assert set(sc) == {2, 5} and all(-1 <= v["centred"] <= 1 for v in sc.values())



def test_protocol_on_a_subset_of_layers_hooks_those_layers():
    """layers=[4] measures layer 4 itself (the same numbers as layer 4 of the all-layers run), not the first block."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    full = measure_equivariance(net, x, scales=(), controls=False)
    sub = measure_equivariance(net, x, scales=(), controls=False, layers=[4])
    assert sub.blocks == [4]
    assert sub.map_norm[0] == pytest.approx(full.map_norm[3], rel=1e-6)
    assert sub.errors["rot90"]["one_minus_cos"][0] == pytest.approx(full.errors["rot90"]["one_minus_cos"][3], rel=1e-6)
