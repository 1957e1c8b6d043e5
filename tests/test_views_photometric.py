"""The batched photometrics against kornia's augmentation modules: same outputs for the same parameters,
same output distribution for random parameters, and the authors' variant's formulas (written here from their
description, not copied)."""

from __future__ import annotations

import math

import kornia.augmentation as K
import pytest
import torch

from ser_plugin.photometric import BatchedPhotometric, blur_kernel_size


def smooth_images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Natural-ish images in [0, 1]: low-frequency colour noise (so blur/contrast/hue all act)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x + 0.1 * torch.rand(n, 3, size, size, generator=g)).clamp(0, 1)


def fixed_params(p: BatchedPhotometric, n: int, seed: int, **over: object) -> dict:
    params = p.sample(n, torch.Generator().manual_seed(seed))
    params["slot"] = torch.arange(n)  # image i in slot i (n divisible by 4: no empty slot)
    for k, v in over.items():
        params[k] = v
    return params


def kornia_jitter(variant: str) -> torch.nn.Module:
    cls = K.ColorJitter if variant == "mocov3" else K.ColorJiggle
    return cls(0.4, 0.4, 0.2, 0.1, p=1.0)


@pytest.mark.parametrize("variant", ["mocov3", "authors"])
def test_colour_jitter_equals_kornia_module_for_the_same_parameters(variant):
    n = 8
    x = smooth_images(n)
    p = BatchedPhotometric(variant)
    off = torch.zeros(n, dtype=torch.bool)
    params = fixed_params(p, n, 1, jitter=torch.ones(n, dtype=torch.bool), gray=off, blur=off, solarize=off)
    ours = p.apply(x, params)
    aug = kornia_jitter(variant)
    for i in range(n):  # kornia shares one order per batch: replay image by image with this image's order
        f = params["factors"][i]
        kp = {
            "brightness_factor": f[0:1], "contrast_factor": f[1:2], "saturation_factor": f[2:3], "hue_factor": f[3:4],
            "order": params["order"][i], "batch_prob": torch.ones(1), "forward_input_shape": torch.tensor([1, 3, 16, 16]),
        }
        ref = aug(x[i : i + 1], params=kp)
        assert torch.allclose(ours[i : i + 1], ref, atol=2e-6), (variant, i, params["order"][i].tolist(), (ours[i] - ref[0]).abs().max())
    # every image got a jitter (none is left as the input)
    assert ((ours - x).abs().flatten(1).amax(1) > 1e-3).all()


@pytest.mark.parametrize("variant", ["mocov3", "authors"])
def test_grayscale_blur_solarize_equal_kornia_modules(variant):
    n = 8
    x = smooth_images(n, 32)
    p = BatchedPhotometric(variant, second=True)
    on, off = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    shape = torch.tensor([n, 3, 32, 32])
    # grayscale alone
    ours = p.apply(x, fixed_params(p, n, 2, jitter=off, gray=on, blur=off, solarize=off))
    assert torch.allclose(ours, K.RandomGrayscale(p=1.0)(x), atol=1e-6)
    # blur alone, per-image sigma, the variant's kernel
    params = fixed_params(p, n, 3, jitter=off, gray=off, blur=on, solarize=off)
    ks = blur_kernel_size(variant, 32)
    ref = K.RandomGaussianBlur((ks, ks), (0.1, 2.0), p=1.0)(x, params={"sigma": params["sigma"], "batch_prob": torch.ones(n), "forward_input_shape": shape})
    assert torch.allclose(p.apply(x, params), ref, atol=1e-5)
    # solarize alone, at the variant's thresholds
    params = fixed_params(p, n, 4, jitter=off, gray=off, blur=off, solarize=on)
    ref = K.RandomSolarize(0.5 if variant == "authors" else 0.0, 0.0, p=1.0)(
        x, params={"thresholds": params["threshold"], "additions": torch.zeros(n), "batch_prob": torch.ones(n), "forward_input_shape": shape})
    assert torch.allclose(p.apply(x, params), ref, atol=1e-6)


def test_blur_kernel_sizes():
    assert blur_kernel_size("mocov3", 224) == 23  # MoCo-v3: about 10% of the side
    assert blur_kernel_size("authors", 224) == 9  # the authors' 9 px at 224, scaled with the side
    assert blur_kernel_size("authors", 448) == 19 and blur_kernel_size("authors", 32) == 3


def test_authors_solarize_threshold_semantics():
    """kornia's RandomSolarize(thresholds=0.5): t ~ U(0, 1); values at or above t become 1 - x (ported from the
    described semantics: ``where(x < t, x, 1 - x)``)."""
    p = BatchedPhotometric("authors", second=True)
    t = torch.cat([p.sample(512, torch.Generator().manual_seed(s))["threshold"] for s in range(4)])
    assert t.min() >= 0 and t.max() <= 1 and abs(t.mean().item() - 0.5) < 0.03 and t.std().item() > 0.25
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(4, 3, 16, 16).contiguous()
    n = 4
    on, off = torch.ones(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    thr = torch.tensor([0.1, 0.35, 0.6, 0.9])
    out = p.apply(ramp, fixed_params(p, n, 0, jitter=off, gray=off, blur=off, solarize=on, threshold=thr))
    port = torch.where(ramp < thr.view(-1, 1, 1, 1), ramp, 1 - ramp)
    assert torch.allclose(out, port, atol=1e-6)
    # MoCo-v3's solarize is the fixed 0.5 threshold
    assert (BatchedPhotometric("mocov3", True).sample(64)["threshold"] == 0.5).all()


def _stats(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image change of mean, log std ratio, and mean saturation proxy (max - min channel)."""
    sat = lambda t: (t.amax(1) - t.amin(1)).mean((1, 2))  # noqa: E731
    return torch.stack([
        y.mean((1, 2, 3)) - x.mean((1, 2, 3)),
        torch.log(y.std((1, 2, 3)) + 1e-6) - torch.log(x.std((1, 2, 3)) + 1e-6),
        sat(y) - sat(x),
    ], 1)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic."""
    grid = torch.cat([a, b]).sort().values
    fa = torch.searchsorted(a.sort().values, grid, right=True) / a.numel()
    fb = torch.searchsorted(b.sort().values, grid, right=True) / b.numel()
    return float((fa - fb).abs().max())


@pytest.mark.parametrize("variant,second", [("mocov3", False), ("mocov3", True), ("authors", True)])
def test_output_distribution_matches_kornia_modules(variant, second):
    """Random parameters: the per-image changes (mean, log std, colourfulness) have the same distribution as
    kornia's module pipeline (two-sample KS, n = 2000 each; 0.062 is the 0.1% critical value
    for real differences: see the next test)."""
    n = 2000
    x = smooth_images(n, 16, seed=5)
    ks = blur_kernel_size(variant, 16)
    jit = K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8) if variant == "mocov3" else K.ColorJiggle(0.4, 0.4, 0.2, 0.1, p=0.8)
    mods = [jit, K.RandomGrayscale(p=0.2), K.RandomGaussianBlur((ks, ks), (0.1, 2.0), p=0.1 if second else 1.0)]
    if second:
        mods.append(K.RandomSolarize(0.5 if variant == "authors" else 0.0, 0.0, p=0.2))
    torch.manual_seed(0)
    with torch.no_grad():
        # kornia shares the jitter order across a batch: run it in small batches so orders vary
        ref = torch.cat([torch.nn.Sequential(*mods)(xb) for xb in x.split(25)])
        ours = BatchedPhotometric(variant, second)(x, generator=torch.Generator().manual_seed(1))
    a, b = _stats(x, ours), _stats(x, ref)
    for j, name in enumerate(["mean shift", "log std ratio", "colourfulness shift"]):
        d = _ks(a[:, j], b[:, j])
        assert d < 0.062, (variant, second, name, d)


def test_distribution_test_detects_a_wrong_brightness_range(monkeypatch):
    """The KS check above can fail: a brightness range of 0.55 instead of 0.4 is caught."""
    import ser_plugin.photometric as P

    monkeypatch.setattr(P, "_BRIGHTNESS", 0.55)
    with pytest.raises(AssertionError, match="mean shift|log std"):
        test_output_distribution_matches_kornia_modules("mocov3", False)


def test_single_channel_and_batch_sizes_not_divisible_by_four():
    for n in (1, 2, 5, 7):
        x = smooth_images(n, 8)[:, :1]
        y = BatchedPhotometric("mocov3", True)(x, generator=torch.Generator().manual_seed(n))
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1


def test_order_is_uniform_per_image():
    """Per image, each of the 24 orders is equally likely (slots are uniform; hue stage static per slot)."""
    p = BatchedPhotometric("mocov3")
    counts = torch.zeros(24)
    perms = {tuple(q): i for i, q in enumerate(__import__("itertools").permutations(range(4)))}
    for s in range(150):
        prm = p.sample(6, torch.Generator().manual_seed(s))  # 6 images in 8 slots
        for row in prm["order"][prm["slot"]].tolist():
            counts[perms[tuple(row)]] += 1
    expected = counts.sum() / 24
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 49.7, chi2  # chi-square, 23 dof, p = 0.001
    assert math.isclose(float(counts.sum()), 900.0)


@pytest.mark.parametrize("variant,second", [("mocov3", False), ("mocov3", True), ("authors", True)])
def test_one_image_cpu_path_equals_the_batched_path(variant, second):
    """A single CPU image (ViewTransform in a loader) skips the batched selects; same draws, same output."""
    p = BatchedPhotometric(variant, second)
    for seed in range(40):
        x = smooth_images(1, 16, seed)
        params = p.sample(1, torch.Generator().manual_seed(seed))
        assert torch.allclose(p(x, params=params), p.apply(x, params), atol=1e-5), seed
