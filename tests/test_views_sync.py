"""No host syncs in making views or in the group actions (issue 12), counted with benchmarks/sync_counter.py and
checked on the ``meta`` device, where any read of an image-side value raises."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from sync_counter import count_syncs  # noqa: E402

import ser_plugin.group as group_mod  # noqa: E402
from ser_plugin import EquivariantViews, GroupElement, act_image, rho  # noqa: E402

CONFIGS = {
    "default": dict(patch_size=4),
    "no_photometric": dict(patch_size=4, photometric=None),
    "authors_d4": dict(patch_size=4, photometric="authors", pairing="authors", image_interpolation="bicubic"),
    "no_identity": dict(patch_size=4, pairing="no_identity"),
}
SCALED = {
    "scale": dict(patch_size=4, scale=(0.7, 1.3)),
    "authors_preset": dict(patch_size=4, scale=(0.7, 1.3), photometric="authors", pairing="authors", image_interpolation="bicubic"),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_views_make_no_host_sync(name):
    views = EquivariantViews(**CONFIGS[name])
    x = torch.rand(6, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    views(x, generator=g)
    with count_syncs() as c:
        pair = views(x, generator=g)
        rel = pair.relative
    assert c.total == 0, c.report()
    assert len(rel) == 6


@pytest.mark.parametrize("name", sorted(SCALED))
def test_scaled_views_read_only_one_cpu_draw(name):
    """With scale, the output sizes are Python ints: one read of a CPU-generator draw (never a device value)."""
    views = EquivariantViews(**SCALED[name])
    x = torch.rand(6, 3, 16, 16)
    with count_syncs() as c:
        views(x, generator=torch.Generator().manual_seed(0))
    assert c.total == 1 and c.by_op == {"Tensor.tolist": 1}, c.report()


@pytest.mark.parametrize("name", sorted(CONFIGS) + sorted(SCALED))
def test_views_run_on_meta_images(name):
    """On the meta device a tensor has no values: every read of an image-side tensor would raise. The CPU
    generator's draws (elements, photometric parameters, sizes) are real and cheap."""
    views = EquivariantViews(**{**CONFIGS, **SCALED}[name])
    pair = views(torch.empty(6, 3, 16, 16, device="meta"), generator=torch.Generator().manual_seed(0))
    assert pair.x1.device.type == "meta" and pair.g1.device.type == "cpu"
    assert pair.x1.shape[-1] % 4 == 0


def test_group_actions_make_no_host_sync():
    g = GroupElement.random(8, generator=torch.Generator().manual_seed(1))
    h = GroupElement.random(8, generator=torch.Generator().manual_seed(2))
    x = torch.rand(8, 3, 12, 12)
    t = torch.rand(8, 5, 3, 4)  # non-square token maps, mixed parities
    with count_syncs() as c:
        rel = h.compose(g.inverse())
        y = act_image(x, rel, size=(12, 12))
        z = act_image(x, rel, size=(8, 16))  # square image, non-square output (scale)
        r = rho(t, rel, size=(4, 3))
        r2 = rho(t, rel, size=(6, 8))
    assert c.total == 0, c.report()
    assert y.shape == (8, 3, 12, 12) and z.shape == (8, 3, 8, 16) and r.shape == (8, 5, 4, 3) and r2.shape == (8, 5, 6, 8)
    # and on meta maps with CPU elements
    m = rho(t.to("meta"), rel, size=(4, 3))
    assert m.device.type == "meta" and m.shape == (8, 5, 4, 3)


def test_sync_guard_fails_when_a_sync_is_added(monkeypatch):
    """The guard above can fail: a host read put into the gather-index builder is counted."""
    real = group_mod._d4_gather_index

    def with_a_sync(h, w, ho, wo, rot, flip):
        if bool((rot == 0).all()):  # the kind of shortcut the old code had
            pass
        return real(h, w, ho, wo, rot, flip)

    monkeypatch.setattr(group_mod, "_d4_gather_index", with_a_sync)
    views = EquivariantViews(patch_size=4)
    with count_syncs() as c:
        views(torch.rand(4, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    assert c.total == 2, c.report()  # one per view
    with pytest.raises(RuntimeError, match="meta"):  # and the meta run refuses to read
        views(torch.empty(4, 3, 8, 8, device="meta"), generator=torch.Generator().manual_seed(0))


def test_mixed_parity_non_square_matches_per_sample_rot90():
    """The branch-free non-square path (both parities computed, selected per sample) equals torch.rot90 per sample."""
    t = torch.rand(8, 2, 3, 5)
    g = GroupElement.random(8, generator=torch.Generator().manual_seed(3))
    for size in [(3, 5), (5, 3), (6, 10)]:
        got = rho(t, g, size=size, mode="bilinear")
        for i in range(8):
            k, f = int(g.rot[i]), bool(g.flip[i])
            ref = torch.rot90(t[i : i + 1].flip(-1) if f else t[i : i + 1], k, (-2, -1))
            ref = torch.nn.functional.interpolate(ref, size=size, mode="bilinear", align_corners=False)
            assert torch.allclose(got[i : i + 1], ref, atol=1e-6), (size, i, k, f)


def test_parity_hint_gives_the_same_result_with_one_branch():
    t = torch.rand(6, 2, 3, 5)
    even = GroupElement.from_d4([0, 2, 2, 0, 2, 0], [0, 1, 0, 1, 1, 0])
    odd = GroupElement.from_d4([1, 3, 1, 3, 3, 1], [0, 1, 0, 1, 1, 0])
    for g, par, size in ((even, False, (6, 10)), (odd, True, (10, 6))):
        assert torch.allclose(rho(t, g, size=size, parity=par), rho(t, g, size=size), atol=1e-6)
        assert torch.equal(rho(t, g, parity=par, mode="nearest"), rho(t, g, mode="nearest"))
