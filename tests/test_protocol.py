"""ser_plugin.protocol: the controls land where they must, and the vacuity guards hold.

- An exactly D4-equivariant toy ViT (D4-invariant patch embedding, token-wise blocks with a global mean mixer,
  a [CLS] that pools) has error ≈ 0 at every block for every D4 element, and an invariant final [CLS].
- The identity control is 0; the permutation control (ρ replaced by a random token permutation) is ≈ 1 on the
  centred cosine; an untrained timm ViT sits well above the toy.
- Vacuity: the maps are not all zero, every element changes the input, and a deliberately broken ρ (identity, or
  the inverse rotation) breaks the check on the same toy.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from ser_plugin import GroupElement, SERError, act_image, protocol, rho
from ser_plugin.protocol import ELEMENTS, ROTATIONS, map_errors, measure_equivariance, untrained_copy


class _PatchEmbed(nn.Module):
    """Average over each p x p patch (D4-invariant inside the patch), then a linear map: exact D4 equivariance."""

    def __init__(self, c: int, dim: int, p: int) -> None:
        super().__init__()
        self.patch_size = (p, p)
        self.pool = nn.AvgPool2d(p)
        self.proj = nn.Linear(c, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(x).flatten(2).transpose(1, 2))  # (B, h*w, dim)


class _Block(nn.Module):
    """Token-wise MLP plus the mean over all tokens (a permutation-equivariant mixer: no positions anywhere)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x) + self.mix(x.mean(1, keepdim=True))


class ToyViT(nn.Module):
    num_prefix_tokens = 1

    def __init__(self, c: int = 3, dim: int = 16, depth: int = 3, p: int = 4) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(c, dim, p)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([_Block(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch_embed(x)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1)
        for b in self.blocks:
            t = b(t)
        return t[:, 0]


def _timm_vit(dynamic: bool = True) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=0, dynamic_img_size=dynamic)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyViT().double(), torch.rand(6, 3, 16, 16, dtype=torch.float64)


D4 = [e for e in ELEMENTS]


def test_exact_equivariant_toy_scores_zero_and_controls_land(toy):
    model, x = toy
    res = measure_equivariance(model, x, scales=(0.75, 1.25), untrained=ToyViT().double())
    assert res.blocks == [1, 2, 3] and res.images == 6
    for name in D4:
        for metric in ("one_minus_cos", "one_minus_cos_centred", "rel_l2"):
            assert max(res.errors[name][metric]) < 1e-6, (name, metric, res.errors[name][metric])
    # the final [CLS] of the toy is D4-invariant (it pools a permutation-equivariant map)
    assert res.cls_invariance is not None and max(res.cls_invariance[n] for n in D4) < 1e-6
    # scale is only approximate on a resampled grid: measured, finite, named resamplers and realised factors
    assert set(res.effective_scale) == {"scale0.75", "scale1.25"} and res.effective_scale["scale0.75"] == pytest.approx(0.75)
    assert res.resampler["tokens"] == "bilinear" and "bilinear" in res.resampler["image"]
    assert all(0 <= v < 1 for v in res.errors["scale0.75"]["one_minus_cos"])
    # controls
    assert max(res.controls["identity"]["rel_l2"]) == 0.0
    assert all(abs(v - 1) < 0.15 for v in res.controls["permutation"]["one_minus_cos_centred"]), res.controls["permutation"]
    assert set(res.controls) == {"identity", "permutation", "untrained"}
    # the rotation summary is the mean cosine over the three quarter turns: 1 for the exact model
    assert all(v == pytest.approx(1.0, abs=1e-6) for v in res.rotation_summary().values())
    assert set(ROTATIONS) <= set(res.errors)


def test_vacuity_guards(toy):
    model, x = toy
    res = measure_equivariance(model, x, scales=(), controls=False)
    assert all(v > 1e-2 for v in res.map_norm), res.map_norm  # the maps are not all zero
    assert all(v > 1e-2 for v in res.input_change.values()) and set(res.input_change) == set(D4)  # every element moves the images
    # a zero model would pass the equivariance check trivially: map_norm exposes it
    zero = ToyViT().double()
    for p in zero.parameters():
        nn.init.zeros_(p)
    assert max(measure_equivariance(zero, x, scales=(), controls=False).map_norm) == 0.0


@pytest.mark.parametrize("broken", ["identity", "inverse"])
def test_a_broken_rho_breaks_the_check(toy, broken, monkeypatch):
    model, x = toy

    def bad_rho(t, g, size=None, mode="bilinear"):
        if broken == "identity":
            return t
        inv = GroupElement.from_d4((-g.rot) % 4, g.flip, device=t.device)  # rot^-k instead of rot^k (and flip kept)
        return rho(t, inv, size=size, mode=mode)

    with monkeypatch.context() as patched:
        patched.setattr(protocol, "rho", bad_rho)  # the protocol's ρ, replaced for this call only
        res = measure_equivariance(model, x, scales=(), controls=False)
    # identity ρ: every element is wrong; inverse rotation: rot90 and rot270 are wrong (rot180 and reflections are involutions)
    wrong = D4 if broken == "identity" else ["rot90", "rot270"]
    for name in wrong:
        assert min(res.errors[name]["one_minus_cos_centred"]) > 0.2, (name, res.errors[name])
    good = measure_equivariance(model, x, scales=(), controls=False)
    assert max(good.errors["rot90"]["one_minus_cos_centred"]) < 1e-6


def test_untrained_timm_vit_is_far_from_equivariant_and_late_cls_works():
    torch.manual_seed(0)
    vit = _timm_vit()
    x = torch.randn(4, 3, 16, 16)
    res = measure_equivariance(vit, x)
    # learned absolute positions: a fresh ViT is not D4-equivariant; above the exact toy by far, below ~1.2
    mean_err = sum(res.errors[n]["one_minus_cos_centred"][0] for n in ROTATIONS) / 3
    assert 0.3 < mean_err < 1.3
    assert res.controls["identity"]["one_minus_cos"][0] < 1e-6
    assert "untrained" in res.controls and res.cls_invariance is not None
    # late [CLS]: blocks 1..L have no prefix token, later blocks have one; the protocol infers it per block
    from ser_plugin import convert_late_cls

    late = convert_late_cls(vit, 2)
    try:
        res2 = measure_equivariance(vit, x, scales=(), controls=("identity",))
        assert len(res2.blocks) == 3 and res2.controls["identity"]["rel_l2"] == [0.0, 0.0, 0.0]
    finally:
        late.remove()


def test_untrained_copy_is_fresh_and_leaves_model_and_rng_alone():
    torch.manual_seed(0)
    vit = _timm_vit()
    before = {k: v.clone() for k, v in vit.state_dict().items()}
    state = torch.random.get_rng_state()
    twin = untrained_copy(vit, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in vit.state_dict().items())
    assert not torch.equal(twin.pos_embed, vit.pos_embed) and not torch.equal(twin.blocks[0].attn.qkv.weight, vit.blocks[0].attn.qkv.weight)
    assert all(torch.equal(a, b) for a, b in zip(untrained_copy(vit, seed=3).state_dict().values(), twin.state_dict().values()))


def test_map_errors_values():
    a = torch.randn(2, 5, 3, 3)
    assert map_errors(a, a) == pytest.approx({"one_minus_cos": 0.0, "one_minus_cos_centred": 0.0, "rel_l2": 0.0}, abs=1e-9)
    e = map_errors(-a, a)
    assert e["one_minus_cos"] == pytest.approx(2.0) and e["rel_l2"] == pytest.approx(2.0)
    with pytest.raises(SERError, match="same shape"):
        map_errors(a, a[:, :, :2])


def test_bad_input_raises_sererror(toy):
    model, x = toy
    with pytest.raises(SERError, match="square"):
        measure_equivariance(model, x[..., :12])
    with pytest.raises(SERError, match="multiple of the patch size"):
        measure_equivariance(model, x[..., :14, :14])
    with pytest.raises(SERError, match="unknown control"):
        measure_equivariance(model, x, controls=("identity", "nope"))
    with pytest.raises(SERError, match="positive"):
        measure_equivariance(model, x, scales=(-1.0,))
    with pytest.raises(SERError, match="dynamic_img_size"):
        measure_equivariance(_timm_vit(dynamic=False), torch.randn(2, 3, 16, 16), controls=False)


def test_plot_uses_the_object_api(toy, tmp_path):
    import matplotlib

    model, x = toy
    res = measure_equivariance(model, x, scales=(), controls=("identity", "permutation"))
    backend = matplotlib.get_backend()
    fig = res.plot(str(tmp_path / "p.png"))
    assert matplotlib.get_backend() == backend
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes[0].lines) == len(res.errors) + 2
    assert "| rot90 |" in res.table() and "control: permutation" in res.table("rel_l2")
    d = res.to_dict()
    assert set(d["rotation_summary"]) == {"1", "2", "3"}


def test_protocol_imports_no_plotting_library():
    code = "import sys, ser_plugin.protocol; bad = [m for m in ('matplotlib', 'timm', 'sklearn') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent))


def test_act_image_moves_test_images(toy):
    _, x = toy
    for name, (k, f, _) in ELEMENTS.items():
        g = GroupElement.from_d4([k] * len(x), [f] * len(x))
        assert not torch.equal(act_image(x, g), x), name
