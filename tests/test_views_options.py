"""View options: pairing (independent / no_identity / authors), image interpolation, input range and the
mean/std convention (issue 9 class 1), reproducibility with a generator (issue 9 class 11)."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from ser_plugin import EquivariantViews, GroupElement, SERError, act_image, rho
from ser_plugin.views import _RangeGuard

IMNET_MEAN, IMNET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def d4_pairs(g: GroupElement):
    return list(zip(g.rot.tolist(), g.flip.int().tolist()))


# ---------------------------------------------------------------------------------------------- pairing
def test_no_identity_pairing_never_draws_the_identity_and_is_uniform_over_the_rest():
    views = EquivariantViews(patch_size=2, photometric=None, pairing="no_identity")
    pair = views(torch.rand(1400, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    rel = d4_pairs(pair.relative)
    assert (0, 0) not in rel
    counts = torch.tensor([rel.count(e) for e in itertools.product(range(4), (0, 1)) if e != (0, 0)], dtype=torch.float)
    expected = 1400 / 7
    assert float(((counts - expected) ** 2 / expected).sum()) < 22.5  # chi-square, 6 dof, p = 0.001
    # view 2 is the relative element applied to view 1, exactly
    assert torch.equal(rho(pair.x1, pair.relative), pair.x2)


def test_independent_pairing_draws_the_identity_one_time_in_eight():
    pair = EquivariantViews(patch_size=2, photometric=None)(torch.rand(4000, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    share = d4_pairs(pair.relative).count((0, 0)) / 4000
    assert abs(share - 1 / 8) < 0.02


@pytest.mark.parametrize("rotations,flips,allowed", [
    (False, True, {(0, 1)}),
    (True, False, {(1, 0), (2, 0), (3, 0)}),
])
def test_no_identity_respects_the_allowed_subgroup(rotations, flips, allowed):
    views = EquivariantViews(patch_size=2, photometric=None, pairing="no_identity", rotations=rotations, flips=flips)
    rel = set(d4_pairs(views(torch.rand(300, 1, 2, 2), generator=torch.Generator().manual_seed(1)).relative))
    assert rel == allowed


def authors_port(x: torch.Tensor, rot180: torch.Tensor, hflip: torch.Tensor, quarter: int, size=None) -> torch.Tensor:
    """The authors' geometric view, written from their description: per sample a 180° turn then a horizontal
    flip, resize (bicubic), then one quarter-turn count for the batch (counter-clockwise, torch.rot90)."""
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1]
        if rot180[i]:
            xi = torch.rot90(xi, 2, (-2, -1))
        if hflip[i]:
            xi = xi.flip(-1)
        out.append(xi)
    y = torch.cat(out)
    if size is not None:
        pre = (size[1], size[0]) if quarter % 2 else size
        y = torch.nn.functional.interpolate(y, size=pre, mode="bicubic", align_corners=False)
    return torch.rot90(y, quarter, (-2, -1))


def test_authors_pairing_matches_the_port_of_their_view_construction():
    from ser_plugin.views import EquivariantViews as EV

    views = EV(patch_size=2, photometric=None, pairing="authors")
    n = 16
    x = torch.rand(n, 3, 6, 6)
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        state = gen.get_state()
        pair = views(x, generator=gen)
        # replay the draws the pairing makes (same generator state) to recover (rot180, flip, quarter turns)
        gen.set_state(state)
        bits = torch.randint(0, 2, (2, n), generator=gen)
        turns = torch.randint(0, 4, (2, 1), generator=gen).flatten().tolist()
        v1 = authors_port(x, bits[0].bool(), bits[1].bool(), turns[0])
        v2 = authors_port(x, ~bits[0].bool(), ~bits[1].bool(), turns[1])  # complementary 180° and flip
        assert torch.equal(pair.x1, v1) and torch.equal(pair.x2, v2), seed


def test_authors_pairing_relative_element_is_always_a_reflection():
    """Enumerating the authors' choices: the relative element is a reflection (flip part 1), all four occur."""
    rels = set()
    for d, f, k1, k2 in itertools.product((0, 1), (0, 1), range(4), range(4)):
        g1 = GroupElement.from_d4([(k1 + 2 * d) % 4], [f])
        g2 = GroupElement.from_d4([(k2 + 2 * (1 - d)) % 4], [1 - f])
        x = torch.rand(1, 1, 4, 4)
        # the port's images agree with the elements
        assert torch.equal(act_image(x, g1), authors_port(x, torch.tensor([d]).bool(), torch.tensor([f]).bool(), k1))
        rels.add(d4_pairs(g2.compose(g1.inverse()))[0])
    assert rels == {(0, 1), (1, 1), (2, 1), (3, 1)}
    pair = EquivariantViews(patch_size=2, photometric=None, pairing="authors")(torch.rand(500, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    assert set(d4_pairs(pair.relative)) <= {(0, 1), (1, 1), (2, 1), (3, 1)}
    assert (pair.g1.rot % 2 == pair.g1.rot[0] % 2).all()  # one quarter-turn count per view for the batch


def test_authors_pairing_with_scale_and_bicubic_matches_the_port():
    views = EquivariantViews(patch_size=2, photometric=None, pairing="authors", scale=(0.7, 1.3), image_interpolation="bicubic")
    n = 8
    x = torch.rand(n, 3, 8, 8)
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    pair = views(x, generator=gen)
    gen.set_state(state)
    bits = torch.randint(0, 2, (2, n), generator=gen)
    turns = torch.randint(0, 4, (2, 1), generator=gen).flatten().tolist()
    v1 = authors_port(x, bits[0].bool(), bits[1].bool(), turns[0], size=tuple(pair.x1.shape[-2:]))
    assert torch.allclose(pair.x1, v1, atol=1e-5)


def test_image_interpolation_bicubic_without_antialias():
    x = torch.rand(4, 3, 16, 16)
    out = {}
    for mode in ("bilinear", "bicubic"):
        views = EquivariantViews(patch_size=4, photometric=None, scale=(0.5, 0.6), image_interpolation=mode)
        out[mode] = views(x, generator=torch.Generator().manual_seed(0))
    p = out["bicubic"]
    ref = act_image(x, GroupElement(p.g1.rot, p.g1.flip, torch.ones_like(p.g1.scale)), size=tuple(p.x1.shape[-2:]), mode="bicubic", antialias=False)
    assert torch.allclose(p.x1, ref, atol=1e-6)
    assert not torch.allclose(out["bilinear"].x1, p.x1, atol=1e-3)


@pytest.mark.parametrize("kw, match", [
    (dict(pairing="random"), "pairing must be one of"),
    (dict(pairing="no_identity", rotations=False, flips=False), "identity is the only element"),
    (dict(pairing="authors", rotations=False), "needs rotations=True and flips=True"),
    (dict(image_interpolation="nearest"), "image_interpolation must be one of"),
    (dict(photometric="simclr"), "photometric must be"),
    (dict(mean=(0.5, 0.5), std=(0.2,)), "one value per channel"),
])
def test_option_errors(kw, match):
    with pytest.raises(SERError, match=match):
        EquivariantViews(**kw)


# ---------------------------------------------------------------------------------------------- input range
@pytest.mark.parametrize("photometric", ["mocov3", "authors"])
def test_out_of_range_images_are_refused_with_the_fix(photometric):
    views = EquivariantViews(patch_size=4, photometric=photometric)
    x = torch.rand(4, 3, 8, 8)
    normalised = (x - torch.tensor(IMNET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMNET_STD).view(1, 3, 1, 1)
    with pytest.raises(SERError, match=r"outside \[0, 1\].*mean=/std=.*divide by 255.*photometric=None"):
        views(normalised)
    with pytest.raises(SERError, match=r"values in \[0(\.\d+)?, 2\d\d"):
        views(x * 255)
    views(x)  # in range: fine
    EquivariantViews(patch_size=4, photometric=None)(normalised)  # no photometrics: no range needed


def test_mean_std_means_normalised_input_and_normalised_views():
    """With mean/std, views of normalised images are the normalised views of the [0, 1] images (same draws)."""
    m, s = torch.tensor(IMNET_MEAN).view(1, 3, 1, 1), torch.tensor(IMNET_STD).view(1, 3, 1, 1)
    x = torch.rand(8, 3, 8, 8)
    for photometric in ("mocov3", "authors", None):
        plain = EquivariantViews(patch_size=4, photometric=photometric)(x, generator=torch.Generator().manual_seed(5))
        norm = EquivariantViews(patch_size=4, photometric=photometric, mean=IMNET_MEAN, std=IMNET_STD)(
            (x - m) / s, generator=torch.Generator().manual_seed(5))
        assert torch.allclose(norm.x1, (plain.x1 - m) / s, atol=1e-5), photometric
        assert torch.allclose(norm.x2, (plain.x2 - m) / s, atol=1e-5), photometric
        assert norm.g1.equals(plain.g1) and norm.g2.equals(plain.g2)


def test_mean_std_with_unnormalised_images_is_refused_with_the_fix():
    """With mean=/std= the input must be normalised: a batch with no value below the mean ([0, 1] images, the form
    that a FutureWarning announced would become an error) is refused, naming the shape and the fix; statistics that
    de-normalise out of [0, 1] are refused too. A normalised batch of the same images passes."""
    m, s = torch.tensor(IMNET_MEAN).view(1, 3, 1, 1), torch.tensor(IMNET_STD).view(1, 3, 1, 1)
    x = torch.rand(4, 3, 8, 8)
    views = EquivariantViews(patch_size=4, mean=IMNET_MEAN, std=IMNET_STD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning any more: an error
        with pytest.raises(SERError, match=r"\(4, 3, 8, 8\) with no value below the mean and none above mean \+ std.*views_input\(x, mean, std\)"):
            views(x)
    views((x - m) / s)  # the normalised form of the same images is accepted
    with pytest.raises(SERError, match="de-normalised with the given mean/std"):
        views(torch.randn(4, 3, 8, 8) * 10)  # wrong statistics (e.g. 0-255 values normalised with 0-1 stats)


def test_small_bright_normalised_batch_is_not_mistaken_for_unnormalised_images():
    """A b2 of 3 bright tiles, properly normalised, can have every pixel above the mean (the study hit it on photos
    with b2 = 3): it reaches above mean + std, so it is accepted; the same tiles un-normalised are still refused."""
    m, s = torch.tensor(IMNET_MEAN).view(1, 3, 1, 1), torch.tensor(IMNET_STD).view(1, 3, 1, 1)
    bright = 0.75 + 0.25 * torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # every pixel above the mean
    views = EquivariantViews(patch_size=4, mean=IMNET_MEAN, std=IMNET_STD)
    x = (bright - m) / s
    assert x.min() >= 0 and x.max() > 1
    pair = views(x)
    assert pair.x1.shape == x.shape
    with pytest.raises(SERError, match="no value below the mean and none above mean \\+ std"):
        views(bright)


class _FakeEvent:
    def __init__(self) -> None:
        self.done = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.done = True


def test_deferred_range_check_raises_once_the_copy_has_landed():
    """The CUDA path (pinned copy + event) in isolation: nothing is read until the event completes."""
    guard = _RangeGuard()
    ev = _FakeEvent()
    guard.pending.append((torch.tensor([-2.1, 2.6, -1.0, 2.0]), ev, (4, 3, 8, 8), False))
    guard.poll()  # not landed yet: no read, no error
    assert len(guard.pending) == 1
    ev.done = True
    with pytest.raises(SERError, match="found asynchronously"):
        guard.poll()
    assert guard.pending == []
    ok = _FakeEvent()
    guard.pending.append((torch.tensor([0.0, 1.0, -1.0, 2.0]), ok, (4, 3, 8, 8), False))
    guard.poll(wait=True)  # waits, in range: fine
    assert guard.pending == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the deferred check's real path)")
def test_deferred_range_check_on_cuda():
    views = EquivariantViews(patch_size=4)
    views(torch.rand(4, 3, 8, 8, device="cuda") * 255)  # refused later, not now
    with pytest.raises(SERError, match="found asynchronously"):
        views.check_pending()


# ---------------------------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("kw", [
    dict(),
    dict(photometric="authors", pairing="authors", scale=(0.7, 1.3), image_interpolation="bicubic"),
    dict(scale=(0.5, 1.5), pairing="no_identity"),
])
def test_same_seed_same_views_photometrics_included(kw):
    views = EquivariantViews(patch_size=4, **kw)
    x = torch.rand(6, 3, 16, 16)
    a = views(x, generator=torch.Generator().manual_seed(7))
    torch.rand(100)  # the global RNG moving on changes nothing
    b = views(x, generator=torch.Generator().manual_seed(7))
    c = views(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.x1, b.x1) and torch.equal(a.x2, b.x2) and a.g1.equals(b.g1) and a.g2.equals(b.g2)
    assert not (a.x1.shape == c.x1.shape and torch.equal(a.x1, c.x1))
    # one generator object, re-seeded
    g = torch.Generator()
    d = views(x, generator=g.manual_seed(7))
    assert torch.equal(a.x1, d.x1) and torch.equal(a.x2, d.x2)


def test_global_seed_reproduces_views_without_a_generator():
    views = EquivariantViews(patch_size=4)
    x = torch.rand(4, 3, 8, 8)
    torch.manual_seed(3)
    a = views(x)
    torch.manual_seed(3)
    b = views(x)
    assert torch.equal(a.x1, b.x1) and torch.equal(a.x2, b.x2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a CUDA generator")
def test_cuda_generator_reproduces_and_cpu_generator_gives_cpu_elements():
    views = EquivariantViews(patch_size=4, scale=(0.7, 1.3))
    x = torch.rand(4, 3, 16, 16, device="cuda")
    a = views(x, generator=torch.Generator("cuda").manual_seed(1))
    b = views(x, generator=torch.Generator("cuda").manual_seed(1))
    assert torch.equal(a.x1, b.x1) and a.x1.shape == b.x1.shape and a.g1.device.type == "cuda"
    c = views(x, generator=torch.Generator().manual_seed(1))
    assert c.g1.device.type == "cpu" and c.x1.device.type == "cuda"


def test_view_transform_no_identity_pairing_and_authors_refused():
    from ser_plugin import ViewTransform, collate_views

    tf = ViewTransform(photometric=None, pairing="no_identity")
    torch.manual_seed(0)
    pair = collate_views([tf(i) for i in torch.rand(64, 1, 4, 4)])
    assert (0, 0) not in d4_pairs(pair.relative)
    assert torch.equal(rho(pair.x1, pair.relative), pair.x2)
    with pytest.raises(SERError, match="pairing='authors'"):
        ViewTransform(pairing="authors")


def test_views_with_pending_checks_deepcopy_and_pickle():
    import copy
    import pickle

    views = EquivariantViews(patch_size=4)
    views._guard.pending.append((torch.zeros(3), lambda: None, (1, 3, 4, 4), False))  # an unpicklable "event"
    for clone in (copy.deepcopy(views), pickle.loads(pickle.dumps(views))):
        assert clone._guard.pending == []
        assert clone(torch.rand(2, 3, 8, 8)).x1.shape == (2, 3, 8, 8)
