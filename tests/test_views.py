"""The equivariant-view policy: elements travel with the views and align them exactly (D4) or closely (scale)."""

from __future__ import annotations

import pytest
import torch
from einops import reduce

from ser_plugin import EquivariantViews, GroupElement, SERError, ViewTransform, collate_views, rescale_pair, rho


def patch_mean(x, p):
    return reduce(x, "b c (h p1) (w p2) -> b c h w", "mean", p1=p, p2=p)


def test_relative_element_aligns_views_exactly_without_photometrics():
    views = EquivariantViews(patch_size=4, photometric=None)
    x = torch.rand(16, 3, 16, 16)
    pair = views(x)
    assert pair.x1.shape == pair.x2.shape == x.shape
    # view 2 = g · view 1 on pixels and, through a per-patch map, on tokens
    assert torch.equal(rho(pair.x1, pair.relative), pair.x2)
    assert torch.allclose(rho(patch_mean(pair.x1, 4), pair.relative), patch_mean(pair.x2, 4), atol=1e-6)
    # and each view is its element applied to the original
    assert torch.equal(rho(x, pair.g1), pair.x1)


def test_elements_are_per_sample_and_diverse():
    views = EquivariantViews(patch_size=4, photometric=None)
    pair = views(torch.rand(256, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    pairs = set(zip(pair.g1.rot.tolist(), pair.g1.flip.tolist()))
    assert len(pairs) == 8  # all of D4 appears in one batch


def test_rotations_flips_switches():
    pair = EquivariantViews(patch_size=4, rotations=False, photometric=None)(torch.rand(64, 3, 8, 8))
    assert (pair.g1.rot == 0).all() and pair.g1.flip.any()
    pair = EquivariantViews(patch_size=4, flips=False, photometric=None)(torch.rand(64, 3, 8, 8))
    assert (~pair.g1.flip).all() and (pair.g1.rot != 0).any()


def test_scale_views_sizes_and_alignment():
    views = EquivariantViews(patch_size=4, photometric=None, scale=(0.5, 1.5))
    torch.manual_seed(0)
    x = torch.nn.functional.interpolate(torch.rand(4, 3, 4, 4), size=(32, 32), mode="bicubic", align_corners=False)
    sizes = set()
    for _ in range(6):
        pair = views(x)
        for v in (pair.x1, pair.x2):
            assert v.shape[-2] % 4 == 0 and v.shape[-1] % 4 == 0
            sizes.add(tuple(v.shape[-2:]))
        # the relative element's scale maps view 1's size to view 2's
        pred = rho(pair.x1, pair.relative, size=tuple(pair.x2.shape[-2:]))
        assert (pred - pair.x2).abs().mean() < 0.1 * pair.x2.std()
    assert len(sizes) > 2


def test_photometric_is_asymmetric_and_not_geometric():
    views = EquivariantViews(patch_size=4)  # MoCo-v3 photometrics
    x = torch.rand(32, 3, 16, 16)
    torch.manual_seed(0)
    pair = views(x)
    assert not torch.allclose(rho(pair.x1, pair.relative), pair.x2)  # photometrics differ between the views
    # photometrics are per-pixel/blur only: undoing the geometry keeps images close to the input in layout
    back = rho(pair.x1, pair.g1.inverse())
    corr = torch.nn.functional.cosine_similarity((back - back.mean()).flatten(1), (x - x.mean()).flatten(1)).mean()
    wrong = torch.nn.functional.cosine_similarity((pair.x1 - pair.x1.mean()).flatten(1), (x - x.mean()).flatten(1)).mean()
    assert corr > wrong


def test_grayscale_single_channel_and_normalisation():
    views = EquivariantViews(patch_size=2, mean=[0.5], std=[0.25])
    pair = views((torch.rand(4, 1, 8, 8) - 0.5) / 0.25)  # normalised input, normalised views
    assert pair.x1.shape == (4, 1, 8, 8) and pair.x1.min() < 0


def test_loader_transform_and_collate():
    tf = ViewTransform(photometric=None)
    imgs = torch.rand(5, 3, 8, 8)
    pair = collate_views([tf(i) for i in imgs])
    assert torch.equal(rho(pair.x1, pair.relative), pair.x2)
    assert torch.equal(rho(imgs, pair.g1), pair.x1)
    scaled = rescale_pair(pair, patch_size=2, scale=(0.5, 1.5), generator=torch.Generator().manual_seed(1))
    assert scaled.g1.has_scale() or scaled.g2.has_scale()
    assert scaled.x1.shape[-1] % 2 == 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: EquivariantViews(patch_size=4)(torch.rand(2, 3, 10, 10)), "not a multiple of patch_size=4"),
        (lambda: EquivariantViews(patch_size=4)(torch.rand(2, 3, 8, 12)), "non-square"),
        (lambda: EquivariantViews(patch_size=4)(torch.rand(3, 8, 8)), r"\(n, C, H, W\)"),
        (lambda: EquivariantViews(patch_size=0), "patch_size"),
        (lambda: EquivariantViews(scale=(1.3, 0.7)), "scale must be"),
        (lambda: EquivariantViews(photometric="simclr"), "photometric"),
        (lambda: EquivariantViews(mean=[0.5]), "give both"),
        (lambda: ViewTransform()(torch.rand(1, 3, 8, 8)), r"one image \(C, H, W\)"),
    ],
)
def test_errors(make, match):
    with pytest.raises(SERError, match=match):
        make()


def test_non_square_without_rotations_is_fine():
    pair = EquivariantViews(patch_size=4, rotations=False, photometric=None)(torch.rand(2, 3, 8, 12))
    assert pair.x1.shape == (2, 3, 8, 12)
    assert isinstance(pair.relative, GroupElement)
