"""Frozen-feature evaluation: linear probe, kNN, equivariance score, robustness, flip-rate, spatial transfer.

All metrics use the backbone as trained (late [CLS] stays on where the arm uses it), in eval mode, under
no_grad. Features are the timm ViT's pooled output (the [CLS] token after the final norm).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_plugin import equivariance_score


# ImageNet-C in miniature: corruptions on images in [0, 1], each with a grid of candidate levels ordered from mild to
# severe. The three severities actually used per dataset are picked from these grids by study/calibrate.py
# (so that a trained baseline keeps meaningful accuracy at every severity) and stored in severities.json beside this
# file. Ops come from kornia where kornia has them (blur, motion blur, brightness, contrast, elastic, JPEG); the noise
# draws follow kornia's RandomGaussianNoise / RandomSaltAndPepperNoise formulas with a fixed torch.Generator, so every
# corrupted test set is the same for every arm and seed.
def _geom(lo: float, hi: float, n: int) -> Tuple[float, ...]:
    return tuple(float(f"{v:.3g}") for v in np.geomspace(lo, hi, n))


CORRUPTION_GRID: Dict[str, Tuple[float, ...]] = {
    "gaussian_noise": _geom(0.005, 0.5, 15),  # std
    "shot_noise": _geom(3000.0, 2.0, 15),  # photons at intensity 1 (Poisson); fewer = noisier
    "impulse_noise": _geom(0.002, 0.3, 15),  # share of salt-and-pepper pixels
    "defocus_blur": _geom(0.3, 4.0, 14),  # Gaussian sigma (px)
    "motion_blur": (3.0, 5.0, 7.0, 9.0, 11.0, 13.0, 15.0, 17.0),  # kernel size (px), direction alternating per image
    "brightness": _geom(0.01, 0.8, 15),  # additive shift
    "contrast": tuple(float(f"{1 - v:.3g}") for v in np.geomspace(0.02, 0.97, 15)),  # factor (1 = unchanged)
    "elastic": _geom(0.3, 30.0, 15),  # kornia elastic_transform2d alpha
    "pixelate": tuple(float(f"{v:.3g}") for v in np.linspace(0.95, 0.12, 15)),  # down-scale factor before upsampling (nearest)
    "jpeg": (90.0, 75.0, 60.0, 50.0, 40.0, 30.0, 25.0, 20.0, 15.0, 10.0, 8.0, 6.0, 4.0, 2.0, 1.0),  # kornia JPEG quality
}
# fallback when a dataset has no calibrated entry (the middle of each grid)
DEFAULT_SEVERITIES: Dict[str, Tuple[float, ...]] = {k: (v[len(v) // 4], v[len(v) // 2], v[(3 * len(v)) // 4]) for k, v in CORRUPTION_GRID.items()}
SEVERITY_FILE = Path(__file__).resolve().parent / "severities.json"

# ImageNet-P in miniature: gradually changing frames; flip probability = share of consecutive frames whose probe
# prediction changes.
SEQUENCES: Dict[str, Tuple[float, ...]] = {
    "rotate": tuple(float(a) for a in np.linspace(-30, 30, 13)),  # degrees
    "scale": tuple(float(s) for s in np.linspace(0.7, 1.3, 13)),  # zoom factor about the centre
    "translate": tuple(float(t) for t in np.linspace(-0.25, 0.25, 11)),  # shift as a share of the image side (diagonal)
}


def severities_for(dataset: str, path: Path = SEVERITY_FILE) -> Dict[str, Tuple[float, ...]]:
    """The three calibrated severities per corruption for ``dataset`` (a Split.name such as ``digits24``), from
    ``severities.json``; corruptions or datasets without an entry fall back to :data:`DEFAULT_SEVERITIES`."""
    table = json.loads(path.read_text()).get("severities", {}) if path.exists() else {}
    got = table.get(dataset, {})
    return {k: tuple(got.get(k, DEFAULT_SEVERITIES[k])) for k in CORRUPTION_GRID}


def corrupt(x: Tensor, kind: str, level: float, seed: int = 0) -> Tensor:
    """Corrupts images ``x`` (N, C, H, W) in [0, 1]; deterministic given ``seed``."""
    import kornia

    n, dev = x.shape[0], x.device
    g = torch.Generator().manual_seed(seed)
    alt = torch.where(torch.arange(n, device=dev) % 2 == 0, 1.0, -1.0)
    if kind == "gaussian_noise":
        return (x + level * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)
    if kind == "shot_noise":
        return (torch.poisson(x.cpu() * level, generator=g).to(x) / level).clamp(0, 1)
    if kind == "impulse_noise":
        u = torch.rand(x[:, :1].shape, generator=g).to(x)
        salt = torch.rand(x[:, :1].shape, generator=g).to(x) < 0.5
        hit = u < level
        return torch.where(hit & salt, torch.ones_like(x), torch.where(hit, torch.zeros_like(x), x))
    if kind == "defocus_blur":
        k = 2 * math.ceil(3 * level) + 1
        return kornia.filters.gaussian_blur2d(x, (k, k), (level, level))
    if kind == "motion_blur":
        return kornia.filters.motion_blur(x, int(level), 45.0 * alt, torch.zeros(n, device=dev))
    if kind == "brightness":
        return kornia.enhance.adjust_brightness(x, level)
    if kind == "contrast":
        return kornia.enhance.adjust_contrast_with_mean_subtraction(x, torch.full((n,), level, device=dev))
    if kind == "elastic":
        noise = (torch.rand((n, 2) + tuple(x.shape[-2:]), generator=g).to(x) * 2 - 1)
        s = x.shape[-1] / 8
        k = 2 * math.ceil(3 * s) + 1
        return kornia.geometry.transform.elastic_transform2d(x, noise, (k, k), (s, s), (level, level), padding_mode="border").clamp(0, 1)
    if kind == "pixelate":
        h, w = x.shape[-2:]
        small = F.interpolate(x, size=(max(1, round(h * level)), max(1, round(w * level))), mode="area")
        return F.interpolate(small, size=(h, w), mode="nearest")
    if kind == "jpeg":
        return kornia.enhance.jpeg_codec_differentiable(x, torch.full((n,), level, device=dev)).clamp(0, 1)
    # sequence frames (ImageNet-P style), identity at the neutral value
    if kind == "rotate":
        return kornia.geometry.transform.rotate(x, torch.full((n,), level, device=dev)) if level != 0 else x
    if kind == "scale":
        return kornia.geometry.transform.scale(x, torch.full((n, 2), level, device=dev)) if level != 1 else x
    if kind == "translate":
        return kornia.geometry.transform.translate(x, torch.full((n, 2), level * x.shape[-1], device=dev)) if level != 0 else x
    raise ValueError(f"unknown corruption {kind!r}")


@torch.no_grad()
def features(model: nn.Module, x: Tensor, mean: Tensor, std: Tensor, batch: int = 256) -> Tensor:
    model.eval()
    dev = next(model.parameters()).device
    out = [model(((x[i : i + batch].to(dev)) - mean) / std).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


class LinearProbe:
    """Multinomial logistic regression on standardised frozen features (scikit-learn, lbfgs)."""

    def __init__(self, c: float = 1.0, max_iter: int = 500) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler()
        self.clf = LogisticRegression(C=c, max_iter=max_iter)

    def fit(self, f: Tensor, y: Tensor) -> LinearProbe:
        import warnings

        from sklearn.exceptions import ConvergenceWarning

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.clf.fit(self.scaler.fit_transform(f.numpy()), y.numpy())
        return self

    def predict(self, f: Tensor) -> np.ndarray:
        return self.clf.predict(self.scaler.transform(f.numpy()))

    def accuracy(self, f: Tensor, y: Tensor) -> float:
        return float((self.predict(f) == y.numpy()).mean())


def knn_accuracy(f_train: Tensor, y_train: Tensor, f_test: Tensor, y_test: Tensor, k: int = 20, t: float = 0.07) -> float:
    """Weighted kNN top-1 on cosine similarity (k neighbours, weights exp(sim / t)): lightly's ``knn_predict``."""
    from lightly.utils.benchmarking import knn_predict

    a, b = F.normalize(f_train, dim=1), F.normalize(f_test, dim=1)
    pred = knn_predict(b, a.T.contiguous(), y_train, int(y_train.max()) + 1, knn_k=min(k, len(a)), knn_t=t)[:, 0]
    return float((pred == y_test).float().mean())


def d4_accuracy(model: nn.Module, probe: LinearProbe, x: Tensor, y: Tensor, mean: Tensor, std: Tensor) -> Dict[str, float]:
    """Probe accuracy on the test images moved by each of the 7 non-identity D4 elements (SER's group): the
    question whether equivariant mid-layer features make the final feature more stable under the group itself."""
    from ser_plugin import GroupElement, act_image

    out = {}
    for k, f in [(k, f) for f in (0, 1) for k in range(4) if (k, f) != (0, 0)]:
        g = GroupElement.from_d4([k] * len(x), [f] * len(x))
        out[f"r{k}{'f' if f else ''}"] = probe.accuracy(features(model, act_image(x, g), mean, std), y)
    return out


def robustness(model: nn.Module, probe: LinearProbe, x: Tensor, y: Tensor, mean: Tensor, std: Tensor,
               severities: Optional[Dict[str, Tuple[float, ...]]] = None) -> Dict[str, Any]:
    """Probe accuracy on corrupted test images (per corruption and severity), their mean (mCA), the flip
    probability of each ImageNet-P-style sequence (share of consecutive frames whose prediction changes) and
    their mean (mFR), and the accuracy under each non-identity D4 element (``d4_acc``, mean ``mD4``)."""
    sev = severities or DEFAULT_SEVERITIES
    acc: Dict[str, List[float]] = {}
    for kind, levels in sev.items():
        acc[kind] = [probe.accuracy(features(model, corrupt(x, kind, lv, seed=i), mean, std), y) for i, lv in enumerate(levels)]
    flips: Dict[str, float] = {}
    for kind, levels in SEQUENCES.items():
        preds = np.stack([probe.predict(features(model, corrupt(x, kind, lv), mean, std)) for lv in levels])
        flips[kind] = float((preds[1:] != preds[:-1]).mean())
    d4 = d4_accuracy(model, probe, x, y, mean, std)
    return {
        "severities": {k: list(v) for k, v in sev.items()},
        "corrupted_acc": acc,
        "mCA": float(np.mean([a for v in acc.values() for a in v])),
        "flip_rate": flips,
        "mFR": float(np.mean(list(flips.values()))),
        "d4_acc": d4,
        "mD4": float(np.mean(list(d4.values()))),
    }


@torch.no_grad()
def patch_tokens(model: nn.Module, x: Tensor, mean: Tensor, std: Tensor, batch: int = 128) -> Tensor:
    """Final-layer patch tokens (after the final norm), prefix tokens removed: (N, h*w, C)."""
    dev = next(model.parameters()).device
    p = int(getattr(model, "num_prefix_tokens", 1))
    out = [model.forward_features((x[i : i + batch].to(dev) - mean) / std)[:, p:].float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def spatial_transfer(model: nn.Module, split: Any, mean: Tensor, std: Tensor, patch: int, canvas: int = 64,
                     per_canvas: int = 2, clutter: Optional[float] = None, n_train: int = 400, seed: int = 0) -> Dict[str, float]:
    """Frozen-backbone dense transfer in miniature (the paper's detection claim, scaled down): scenes of
    ``per_canvas`` images of different classes at random positions on a ``canvas`` with a cluttered background
    (:func:`data.compose_scene`; ``clutter`` from severities.json, calibrated per dataset by study/calibrate.py).
    Two linear probes on the frozen final-layer patch tokens, fitted on scenes of training images and scored on
    scenes of test images:

    - ``mask_IoU`` (localisation): a ridge probe per token, object vs background (the label of the pixel at the
      token's centre; digits' strokes, the whole tile for the patch sets), threshold 0.5; IoU of the predicted
      and true foreground tokens over all test scenes. ``chance_mask_IoU``: calling every token foreground.
    - ``roi_top1`` (recognition in place): each object's class from the mean of the patch tokens inside its box
      (logistic regression, as the [CLS] probe): RoI classification with the box given.
    """
    from .data import compose_scene

    if clutter is None:
        clutter = spatial_clutter_for(split.name)
    ink = 0.2 if split.name.startswith("digits") else None
    g = torch.Generator().manual_seed(seed)
    xtr, ltr, otr = compose_scene(split.x_train[: n_train * per_canvas], split.y_train[: n_train * per_canvas], canvas, g,
                                  per_canvas, ink, clutter)
    xte, lte, ote = compose_scene(split.x_test, split.y_test, canvas, g, per_canvas, ink, clutter)
    side = canvas // patch
    centre = torch.arange(side) * patch + patch // 2

    def fg_tokens(lab: Tensor) -> Tensor:
        return (lab[:, centre][:, :, centre] > 0).reshape(-1)

    def roi(tokens: Tensor, objs: Tensor) -> Tuple[Tensor, Tensor]:
        t = tokens.view(len(tokens), side, side, -1)
        inside = lambda lo, hi: (centre >= lo) & (centre < hi)  # noqa: E731
        f = [t[i][inside(o[1], o[3])][:, inside(o[0], o[2])].mean((0, 1)) for i in range(len(t)) for o in objs[i]]
        return torch.stack(f), objs[:, :, 4].reshape(-1)

    ttr, tte = patch_tokens(model, xtr, mean, std), patch_tokens(model, xte, mean, std)
    a = ttr.reshape(-1, ttr.shape[-1]).double()
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-6)
    a = torch.cat([(a - mu) / sd, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    coef = torch.linalg.solve(a.T @ a + 1.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ fg_tokens(ltr).double())
    b = tte.reshape(-1, tte.shape[-1]).double()
    pred = (torch.cat([(b - mu) / sd, torch.ones(len(b), 1, dtype=b.dtype)], 1) @ coef) > 0.5
    true = fg_tokens(lte)
    ftr, ytr = roi(ttr, otr)
    fte, yte = roi(tte, ote)
    return {"mask_IoU": float((pred & true).sum()) / max(float((pred | true).sum()), 1.0),
            "chance_mask_IoU": float(true.float().mean()),
            "roi_top1": LinearProbe().fit(ftr, ytr).accuracy(fte, yte),
            "clutter": float(clutter), "scenes_test": int(len(xte))}


def spatial_clutter_for(dataset: str, path: Path = SEVERITY_FILE) -> float:
    """The calibrated background clutter of the spatial probe for ``dataset`` (severities.json), 0 if none."""
    table = json.loads(path.read_text()).get("spatial_clutter", {}) if path.exists() else {}
    return float(table.get(dataset, 0.0))


def evaluate(model: nn.Module, split: Any, cfg: Any, *, robust: bool = True, spatial: bool = False,
             n_equiv: int = 128, n_robust: int = 256, n_protocol: int = 32, score_layers: Optional[List[int]] = None) -> Dict[str, Any]:
    """All frozen-feature metrics for one trained backbone. ``split``: :class:`data.Split`; ``cfg``: train.Config."""
    dev = next(model.parameters()).device
    c = split.x_train.shape[1]
    mean = torch.tensor(cfg.mean[:c], device=dev).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std[:c], device=dev).view(1, -1, 1, 1)
    model.eval()
    ftr, fte = features(model, split.x_train, mean, std), features(model, split.x_test, mean, std)
    probe = LinearProbe().fit(ftr, split.y_train)
    out: Dict[str, Any] = {
        "linear_top1": probe.accuracy(fte, split.y_test),
        "knn_top1": knn_accuracy(ftr, split.y_train, fte, split.y_test),
    }
    layers = sorted(set(score_layers or [cfg.layer, cfg.depth]))
    xe = ((split.x_test[:n_equiv].to(dev)) - mean) / std
    sc = equivariance_score(model, xe, layers=layers)
    out["equivariance"] = {str(k): v for k, v in sc.items()}
    out["eq_centred_L"] = sc[cfg.layer]["centred"]
    out["eq_raw_L"] = sc[cfg.layer]["raw"]
    out["eq_centred_last"] = sc[cfg.depth]["centred"]
    out["eq_raw_last"] = sc[cfg.depth]["raw"]
    if n_protocol:
        from ser_plugin.protocol import measure_equivariance

        prot = measure_equivariance(model, xe[:n_protocol], controls=("identity", "permutation"))
        out["protocol"] = prot.to_dict()
        out["rot_equiv_L"] = prot.rotation_summary()[cfg.layer]
        out["cls_inv_d4"] = float(np.mean([v for k, v in (prot.cls_invariance or {}).items() if not k.startswith("scale")])) if prot.cls_invariance else float("nan")
    if robust:
        out["robustness"] = robustness(model, probe, split.x_test[:n_robust], split.y_test[:n_robust], mean, std,
                                       severities=severities_for(split.name))
        out["mCA"] = out["robustness"]["mCA"]
        out["mFR"] = out["robustness"]["mFR"]
        out["mD4"] = out["robustness"]["mD4"]
    if spatial:
        out["spatial"] = spatial_transfer(model, split, mean, std, cfg.patch)
    return out
