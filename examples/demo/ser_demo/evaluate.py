"""Frozen-feature evaluation: linear probe, kNN, equivariance score, robustness, flip-rate, spatial transfer.

All metrics use the backbone as trained (late [CLS] stays on where the arm uses it), in eval mode, under
no_grad. Features are the timm ViT's pooled output (the [CLS] token after the final norm).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_plugin import equivariance_score

# severities of each corruption (applied to images in [0, 1]); ImageNet-C in miniature
CORRUPTIONS: Dict[str, Tuple[float, ...]] = {
    "noise": (0.1, 0.2, 0.4),  # Gaussian noise std
    "blur": (0.6, 1.2, 1.8),  # Gaussian blur sigma (px at 32 px)
    "contrast": (0.6, 0.4, 0.2),  # contrast factor (1 = unchanged)
    "rotate": (10.0, 20.0, 30.0),  # rotation in degrees (alternating sign per image)
}
# gradually increasing perturbation sequences (ImageNet-P in miniature)
SEQUENCES: Dict[str, Tuple[float, ...]] = {
    "rotate": tuple(float(a) for a in np.linspace(0, 30, 7)),
    "noise": tuple(float(s) for s in np.linspace(0, 0.3, 7)),
}


def corrupt(x: Tensor, kind: str, level: float, seed: int = 0) -> Tensor:
    """Corrupts images ``x`` (N, C, H, W) in [0, 1] with kornia ops; deterministic given ``seed``."""
    import kornia

    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        return (x + level * torch.randn(x.shape, generator=g).to(x)).clamp(0, 1)
    if kind == "blur":
        k = 2 * math.ceil(3 * level) + 1
        return kornia.filters.gaussian_blur2d(x, (k, k), (level, level))
    if kind == "contrast":
        return kornia.enhance.adjust_contrast_with_mean_subtraction(x, torch.full((x.shape[0],), level, device=x.device))
    if kind == "rotate":
        sign = torch.where(torch.arange(x.shape[0], device=x.device) % 2 == 0, 1.0, -1.0)
        return kornia.geometry.transform.rotate(x, sign * level)
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
    """DINO-style weighted kNN on cosine similarity (k neighbours, weights exp(sim / t))."""
    a, b = F.normalize(f_train, dim=1), F.normalize(f_test, dim=1)
    sim = b @ a.T
    w, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(b), int(y_train.max()) + 1)
    votes.scatter_add_(1, y_train[idx], (w / t).exp())
    return float((votes.argmax(1) == y_test).float().mean())


def robustness(model: nn.Module, probe: LinearProbe, x: Tensor, y: Tensor, mean: Tensor, std: Tensor) -> Dict[str, Any]:
    """Probe accuracy on corrupted test images (per corruption and severity), their mean (mCA), and the
    flip-rate: the share of consecutive frames of a gradually increasing perturbation whose prediction changes."""
    acc: Dict[str, List[float]] = {}
    for kind, levels in CORRUPTIONS.items():
        acc[kind] = [probe.accuracy(features(model, corrupt(x, kind, lv, seed=i), mean, std), y) for i, lv in enumerate(levels)]
    flips: Dict[str, float] = {}
    for kind, levels in SEQUENCES.items():
        preds = np.stack([probe.predict(features(model, corrupt(x, kind, lv, seed=0) if lv > 0 else x, mean, std)) for lv in levels])
        flips[kind] = float((preds[1:] != preds[:-1]).mean())
    return {
        "corrupted_acc": acc,
        "mCA": float(np.mean([a for v in acc.values() for a in v])),
        "flip_rate": flips,
        "mFR": float(np.mean(list(flips.values()))),
    }


@torch.no_grad()
def patch_tokens(model: nn.Module, x: Tensor, mean: Tensor, std: Tensor, batch: int = 128) -> Tensor:
    """Final-layer patch tokens (after the final norm), prefix tokens removed: (N, h*w, C)."""
    dev = next(model.parameters()).device
    p = int(getattr(model, "num_prefix_tokens", 1))
    out = [model.forward_features((x[i : i + batch].to(dev) - mean) / std)[:, p:].float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def spatial_transfer(model: nn.Module, x_train: Tensor, x_test: Tensor, mean: Tensor, std: Tensor, patch: int,
                     canvas: int = 64, n_train: int = 600, seed: int = 0) -> Dict[str, float]:
    """Frozen-backbone localisation in miniature: each digit is pasted at a random position on a black
    ``canvas``; a linear (ridge) probe on frozen patch tokens predicts, per token, whether the token's centre
    lies in the digit's box (scores clipped to [0, 1]); the predicted box is the probability-weighted mean ± 2 std of token centres (so it is
    defined even when no token passes 0.5). Reports mean IoU and mean centre error (px) on test digits.
    """
    from .data import place_on_canvas

    g = torch.Generator().manual_seed(seed)
    ctr, btr = place_on_canvas(x_train[:n_train], canvas, g)
    cte, bte = place_on_canvas(x_test, canvas, g)
    side = canvas // patch
    centres = (torch.arange(side).float() + 0.5) * patch
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    cx, cy = cx.reshape(-1), cy.reshape(-1)

    def labels(boxes: Tensor) -> Tensor:
        inside = (cx[None] >= boxes[:, 0:1]) & (cx[None] < boxes[:, 2:3]) & (cy[None] >= boxes[:, 1:2]) & (cy[None] < boxes[:, 3:4])
        return inside.reshape(-1).long()

    ttr, tte = patch_tokens(model, ctr, mean, std), patch_tokens(model, cte, mean, std)
    # ridge regression on standardised tokens (closed form: fast and deterministic), clipped to [0, 1]
    a = ttr.reshape(-1, ttr.shape[-1]).double()
    mu, sd = a.mean(0), a.std(0).clamp_min(1e-6)
    a = torch.cat([(a - mu) / sd, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    t = labels(btr).double()
    coef = torch.linalg.solve(a.T @ a + 1.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ t)
    b = tte.reshape(-1, tte.shape[-1]).double()
    b = torch.cat([(b - mu) / sd, torch.ones(len(b), 1, dtype=b.dtype)], 1)
    prob = (b @ coef).clamp(0, 1).float().view(len(cte), -1)
    w = prob / prob.sum(1, keepdim=True).clamp_min(1e-6)
    mx, my = (w * cx).sum(1), (w * cy).sum(1)
    sx = ((w * (cx - mx[:, None]) ** 2).sum(1)).sqrt()
    sy = ((w * (cy - my[:, None]) ** 2).sum(1)).sqrt()
    pred = torch.stack([mx - 2 * sx, my - 2 * sy, mx + 2 * sx, my + 2 * sy], 1).clamp(0, canvas)
    ix = (torch.minimum(pred[:, 2], bte[:, 2]) - torch.maximum(pred[:, 0], bte[:, 0])).clamp_min(0)
    iy = (torch.minimum(pred[:, 3], bte[:, 3]) - torch.maximum(pred[:, 1], bte[:, 1])).clamp_min(0)
    inter = ix * iy
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    iou = inter / (area(pred) + area(bte) - inter).clamp_min(1e-6)
    centre_err = ((mx - (bte[:, 0] + bte[:, 2]) / 2) ** 2 + (my - (bte[:, 1] + bte[:, 3]) / 2) ** 2).sqrt()
    token_acc = float(((prob > 0.5).long().reshape(-1) == labels(bte)).float().mean())
    return {"mIoU": float(iou.mean()), "centre_err_px": float(centre_err.mean()), "token_acc": token_acc}


def evaluate(model: nn.Module, split: Any, cfg: Any, *, robust: bool = True, spatial: bool = False,
             n_equiv: int = 256, n_robust: int = 300, score_layers: Optional[List[int]] = None) -> Dict[str, Any]:
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
    if robust:
        out["robustness"] = robustness(model, probe, split.x_test[:n_robust], split.y_test[:n_robust], mean, std)
        out["mCA"] = out["robustness"]["mCA"]
        out["mFR"] = out["robustness"]["mFR"]
    if spatial:
        out["spatial"] = spatial_transfer(model, split.x_train, split.x_test, mean, std, cfg.patch)
    return out
