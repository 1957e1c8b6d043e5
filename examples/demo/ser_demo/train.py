"""Pretraining for the demo and the study: a small timm ViT, a lightly SSL objective, optional SER.

The batch split (docs/method.md §7, matched 2-view budget): each batch of B images is split into ``b1``
(the host's usual two random-resized-crop views) and ``b2`` (a share ``b2_share`` of the batch) whose two
views come from SER's equivariant-view policy T_eq (photometric + D4, no crop between the views). Both
views of b1 *and* b2 enter the host SSL loss: ``L = L_inv(b1 ∪ b2) + λ·L_equiv(b2)``. Every arm sees
exactly 2 views per image.

Arms (``ARMS``):

- ``baseline``: stock ViT, the whole batch gets the host's ordinary views (b2 empty). This is the plain
  host method.
- ``views``: stock ViT, b2 views from T_eq in the SSL loss, λ=0 (what the views alone do).
- ``lam0``: the paper's λ=0 control: late [CLS] after block L + b2 views from T_eq, no SER loss.
- ``ser``: SER on the stock ViT (library default: prefix tokens stripped at block L).
- ``ser_late``: SER + late [CLS] (the paper's architecture).
- ``ser_head``: SER on the stock ViT with the LayerNorm+MLP token head (the released code's head).
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_plugin import EquivariantViews, attach_ser, convert_late_cls

ARMS: Dict[str, Dict[str, Any]] = {
    "baseline": dict(b2=False, late_cls=False, ser=False, head=False),
    "views": dict(b2=True, late_cls=False, ser=False, head=False),
    "lam0": dict(b2=True, late_cls=True, ser=False, head=False),
    "ser": dict(b2=True, late_cls=False, ser=True, head=False),
    "ser_late": dict(b2=True, late_cls=True, ser=True, head=False),
    "ser_head": dict(b2=True, late_cls=False, ser=True, head=True),
}
OBJECTIVES = ("mocov3", "dino", "barlow")
# docs/method.md §4: λ and τ per objective (released code: λ 1.0 MoCo-v3 / 0.3 DINO / 1.0 Barlow Twins; τ 0.3-0.5)
DEFAULT_LAM = {"mocov3": 1.0, "dino": 0.3, "barlow": 1.0}
DEFAULT_TAU = {"mocov3": 0.4, "dino": 0.5, "barlow": 0.4}


@dataclass
class Config:
    objective: str = "mocov3"
    arm: str = "ser"
    epochs: int = 10
    steps: Optional[int] = None  # total optimiser steps (overrides epochs; the study fixes it across datasets)
    width: int = 48
    depth: int = 4
    heads: int = 4
    patch: int = 4
    img_size: int = 24
    batch: int = 128
    b2_share: float = 0.25
    layer: int = 2
    lam: Optional[float] = None  # None: DEFAULT_LAM[objective]
    tau: Optional[float] = None  # None: DEFAULT_TAU[objective]
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 3
    crop_scale: Tuple[float, float] = (0.35, 1.0)
    seed: int = 0
    device: str = "cpu"
    max_steps: Optional[int] = None  # stop early (smoke runs)
    proj_dim: int = 64
    hidden_dim: int = 256
    mean: Tuple[float, ...] = field(default_factory=lambda: (0.5, 0.5, 0.5))
    std: Tuple[float, ...] = field(default_factory=lambda: (0.5, 0.5, 0.5))
    # a SERConfig preset (e.g. "authors"): its views, photometrics, head and late [CLS] replace the arm's; scale stays
    # off because the matched budget concatenates the SER views with b1's fixed-size crops
    preset: Optional[str] = None
    # False: b2's T_eq views feed SER's loss only, not the host's SSL loss (no L_inv2 on D4-moved views). Not the
    # paper (there, b2's views join the invariance loss); isolates what L_inv2's D4 invariance does.
    b2_in_ssl: bool = True

    def resolved(self) -> Config:
        c = copy.copy(self)
        if c.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {c.objective!r}")
        if c.arm not in ARMS:
            raise ValueError(f"arm must be one of {list(ARMS)}, got {c.arm!r}")
        if not 1 <= c.layer <= c.depth:
            raise ValueError(f"layer must be in 1..depth={c.depth}, got {c.layer}")
        c.lam = DEFAULT_LAM[c.objective] if c.lam is None else c.lam
        c.tau = DEFAULT_TAU[c.objective] if c.tau is None else c.tau
        return c

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def build_vit(cfg: Config, in_chans: int) -> nn.Module:
    """timm's VisionTransformer, small; ``dynamic_img_size`` so the spatial probe can feed bigger canvases."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=cfg.img_size, patch_size=cfg.patch, in_chans=in_chans, num_classes=0, embed_dim=cfg.width,
        depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=2.0, dynamic_img_size=True,
    )


def _uniform(n: int, lo: float, hi: float, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device)


class Photometric(nn.Module):
    """A cheap MoCo-v3-style photometric view for small grey images (no geometric part), batched per sample:
    brightness and contrast jitter (0.4, p=0.8), Gaussian blur (kornia; p=1.0 for view 1, 0.1 for view 2, sigma
    U(0.1, 1.0) at 32 px) and solarize (p=0.2, view 2 only). The same module makes the photometric part of
    SER's T_eq views (passed as ``photometric=(p1, p2)``), so b1 and b2 differ only geometrically.
    (``ser_plugin``'s kornia MoCo-v3 pipeline is about 10x slower per image on these CPUs.)
    """

    def __init__(self, second: bool) -> None:
        super().__init__()
        self.second = second

    def forward(self, x: Tensor) -> Tensor:
        import kornia.filters as KF

        n, dev = x.shape[0], x.device
        jit = (torch.rand(n, device=dev) < 0.8).float().view(-1, 1, 1, 1)
        b = 1 + jit * (_uniform(n, -0.4, 0.4, dev).view(-1, 1, 1, 1))
        c = 1 + jit * (_uniform(n, -0.4, 0.4, dev).view(-1, 1, 1, 1))
        m = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x * b - m * b) * c + m * b).clamp(0, 1)
        p_blur = 0.1 if self.second else 1.0
        sig = _uniform(n, 0.1, 1.0, dev)
        blurred = KF.gaussian_blur2d(x, (5, 5), torch.stack([sig, sig], 1))
        use = (torch.rand(n, device=dev) < p_blur).float().view(-1, 1, 1, 1)
        x = use * blurred + (1 - use) * x
        if self.second:
            sol = (torch.rand(n, device=dev) < 0.2).view(-1, 1, 1, 1)
            x = torch.where(sol & (x >= 0.5), 1 - x, x)
        return x


class HostViews(nn.Module):
    """The host's ordinary two views (MoCo-v3 style): random resized crop (area ``crop_scale``, aspect
    [3/4, 4/3]) + horizontal flip, as one batched affine resampling, then :class:`Photometric`."""

    def __init__(self, size: int, crop_scale: Tuple[float, float]) -> None:
        super().__init__()
        self.size, self.crop_scale = size, crop_scale
        self.p1, self.p2 = Photometric(False), Photometric(True)

    def crop(self, x: Tensor) -> Tensor:
        n, dev = x.shape[0], x.device
        area = _uniform(n, *self.crop_scale, dev)
        logr = _uniform(n, math.log(3 / 4), math.log(4 / 3), dev)
        sw = (area * logr.exp()).sqrt().clamp(max=1.0)  # crop width / image width
        sh = (area / logr.exp()).sqrt().clamp(max=1.0)
        cx = (torch.rand(n, device=dev) * 2 - 1) * (1 - sw)
        cy = (torch.rand(n, device=dev) * 2 - 1) * (1 - sh)
        flip = torch.where(torch.rand(n, device=dev) < 0.5, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = sw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = sh, cy
        grid = F.affine_grid(theta, [n, x.shape[1], self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.p1(self.crop(x)), self.p2(self.crop(x))


class Objective(nn.Module):
    """The host SSL method: online/target heads and the lightly loss. ``loss(online, f1, f2, step)``."""

    def __init__(self, cfg: Config, backbone: nn.Module) -> None:
        super().__init__()
        from lightly.loss import BarlowTwinsLoss, DINOLoss, NTXentLoss
        from lightly.models.modules.heads import BarlowTwinsProjectionHead, DINOProjectionHead, MoCoProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        self.kind = cfg.objective
        w, h, p = cfg.width, cfg.hidden_dim, cfg.proj_dim
        self.teacher: Optional[nn.Module] = None
        make_proj: Callable[[], nn.Module]
        if self.kind == "mocov3":
            def make_proj() -> nn.Module:
                return MoCoProjectionHead(w, h, p, num_layers=3, batch_norm=True)
            self.pred = MoCoProjectionHead(p, h, p, num_layers=2, batch_norm=True)
            self.criterion = NTXentLoss(temperature=0.2)
        elif self.kind == "dino":
            def make_proj() -> nn.Module:
                return DINOProjectionHead(w, h, p, 1024, freeze_last_layer=1)
            self.criterion = DINOLoss(output_dim=1024, warmup_teacher_temp=0.04, teacher_temp=0.04,
                                      warmup_teacher_temp_epochs=1)
        else:
            def make_proj() -> nn.Module:
                return BarlowTwinsProjectionHead(w, h, h)
            self.criterion = BarlowTwinsLoss(lambda_param=5e-3)
        self.proj = make_proj()
        if self.kind in ("mocov3", "dino"):
            # teacher = momentum copy of backbone + projection head. The backbone is copied *after* SER/late-CLS
            # are attached, so it has the same architecture (late [CLS] hooks are copied; SER's capture hook
            # becomes inert in the copy). The head is rebuilt and loaded (weight_norm heads cannot be deep-copied).
            tproj = make_proj()
            tproj.load_state_dict(self.proj.state_dict())
            self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "proj": tproj})
            deactivate_requires_grad(self.teacher)

    def momentum(self, step: int, total: int) -> float:
        from lightly.utils.scheduler import cosine_schedule

        start = 0.99 if self.kind == "mocov3" else 0.996
        return float(cosine_schedule(step, max(total, 1), start, 1.0))

    def update_teacher(self, backbone: nn.Module, m: float) -> None:
        from lightly.models.utils import update_momentum

        if self.teacher is not None:
            update_momentum(backbone, self.teacher["backbone"], m)
            update_momentum(self.proj, self.teacher["proj"], m)

    def loss(self, f1: Tensor, f2: Tensor, v1: Tensor, v2: Tensor, epoch: int) -> Tensor:
        """f1, f2: online backbone features of views 1 and 2 (all of b1 ∪ b2); v1, v2: the view images."""
        if self.kind == "barlow":
            return self.criterion(self.proj(f1), self.proj(f2))
        assert self.teacher is not None
        with torch.no_grad():
            t = self.teacher["proj"](self.teacher["backbone"](torch.cat([v1, v2])))
            t1, t2 = t.chunk(2)
        if self.kind == "mocov3":
            q1, q2 = self.pred(self.proj(torch.cat([f1, f2]))).chunk(2)
            return self.criterion(q1, t2) + self.criterion(q2, t1)
        s1, s2 = self.proj(torch.cat([f1, f2])).chunk(2)
        return self.criterion([t1, t2], [s1, s2], epoch=epoch)


@dataclass
class Trained:
    backbone: nn.Module
    cfg: Config
    history: List[Dict[str, float]]
    train_seconds: float
    steps: int
    ser: Any = None  # the SER handle (attached) or None
    late: Any = None  # LateCLS handle or None


def _normalise(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    return (x - mean) / std


def pretrain(cfg: Config, x_train: Tensor, progress: Optional[Callable[..., Any]] = None,
             checkpoints: Sequence[int] = (), on_checkpoint: Optional[Callable[[int, nn.Module], None]] = None) -> Trained:
    """Pretrains one arm. ``x_train``: (N, C, S, S) in [0, 1]. Returns the backbone with its hooks still on
    (late [CLS] is part of the architecture); evaluation uses the backbone as is. ``on_checkpoint(step, backbone)``
    is called after each step count in ``checkpoints`` (learning curves; the backbone is put in eval mode for the
    call and back in train mode after it)."""
    cfg = cfg.resolved()
    arm = ARMS[cfg.arm]
    torch.manual_seed(cfg.seed)
    dev = torch.device(cfg.device)
    c = x_train.shape[1]
    backbone = build_vit(cfg, c).to(dev)
    mean = torch.tensor(cfg.mean[:c], device=dev).view(1, -1, 1, 1)
    std = torch.tensor(cfg.std[:c], device=dev).view(1, -1, 1, 1)
    ser, late = None, None
    if arm["ser"] and cfg.preset is not None:
        ser = attach_ser(backbone, layer=cfg.layer, preset=cfg.preset, lam=cfg.lam, tau=cfg.tau, scale=None,
                         mean=cfg.mean[:c], std=cfg.std[:c]).to(dev)
        teq = ser.view_policy
    elif arm["ser"]:
        ser = attach_ser(backbone, layer=cfg.layer, lam=cfg.lam, tau=cfg.tau, head=arm["head"], late_cls=arm["late_cls"],
                         photometric=(Photometric(False), Photometric(True)), mean=cfg.mean[:c], std=cfg.std[:c]).to(dev)
        teq = ser.view_policy
    else:
        if arm["late_cls"]:
            late = convert_late_cls(backbone, cfg.layer)
        teq = EquivariantViews(patch_size=cfg.patch, photometric=(Photometric(False), Photometric(True)),
                               mean=cfg.mean[:c], std=cfg.std[:c]).to(dev)
    host_views = HostViews(cfg.img_size, cfg.crop_scale).to(dev)
    obj = Objective(cfg, backbone).to(dev)
    params = list(backbone.parameters()) + [p for n, p in obj.named_parameters() if not n.startswith("teacher.")]
    if ser is not None:
        params += list(ser.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = x_train.shape[0]
    steps_per_epoch = max(1, n // cfg.batch)
    total = steps_per_epoch * cfg.epochs if cfg.steps is None else cfg.steps
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warm = min(cfg.warmup_epochs * steps_per_epoch, total // 4)
    from lightly.utils.scheduler import CosineWarmupScheduler

    # linear warm-up to cfg.lr, then cosine to 0 (per step)
    sched = CosineWarmupScheduler(opt, warmup_epochs=warm, max_epochs=total, end_value=0.0)
    n2 = int(round(cfg.b2_share * cfg.batch)) if arm["b2"] else 0
    if arm["b2"] and n2 < 2:
        raise ValueError(f"b2 needs >= 2 images (batch {cfg.batch} x b2_share {cfg.b2_share} = {n2}).")
    gen = torch.Generator().manual_seed(cfg.seed)
    history: List[Dict[str, float]] = []
    bar = progress(total=total, desc=f"{cfg.objective}/{cfg.arm} seed {cfg.seed}", leave=False) if progress else None
    step, t0 = 0, time.perf_counter()
    backbone.train()
    obj.train()
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for b in range(steps_per_epoch):
            if step >= total:
                break
            epoch = step // steps_per_epoch
            x = x_train[perm[b * cfg.batch : (b + 1) * cfg.batch]].to(dev)
            xb2, xb1 = x[:n2], x[n2:]
            with torch.no_grad():
                a1, a2 = host_views(xb1)
                a1, a2 = _normalise(a1, mean, std), _normalise(a2, mean, std)
                pair = teq(_normalise(xb2, mean, std)) if n2 else None  # the views take normalised input (mean/std given)
            f1, f2 = backbone(torch.cat([a1, a2])).chunk(2)
            equiv = torch.zeros((), device=dev)
            v1, v2 = a1, a2
            if pair is not None and (ser is not None or cfg.b2_in_ssl):
                with ser.capture() if ser is not None else nullcontext():
                    e1, e2 = backbone(torch.cat([pair.x1, pair.x2])).chunk(2)
                if ser is not None:
                    equiv = ser.loss(pair)
                if cfg.b2_in_ssl:  # the paper: b2's views join the host's invariance loss (L_inv2)
                    f1, f2 = torch.cat([f1, e1]), torch.cat([f2, e2])
                    v1, v2 = torch.cat([a1, pair.x1]), torch.cat([a2, pair.x2])
            inv = obj.loss(f1, f2, v1, v2, epoch)
            loss = inv + equiv
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if obj.kind == "dino":
                obj.proj.cancel_last_layer_gradients(epoch)
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            opt.step()
            lr = opt.param_groups[0]["lr"]
            sched.step()
            obj.update_teacher(backbone, obj.momentum(step, total))
            rec = {"step": step, "lr": lr, "loss": float(loss.detach()), "inv": float(inv.detach()),
                   "equiv": float(ser.last_loss) if ser is not None and ser.last_loss is not None else float("nan"),
                   "t": time.perf_counter() - t0}
            if not math.isfinite(rec["loss"]):
                raise FloatingPointError(f"loss diverged at step {step}: {rec}")
            history.append(rec)
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(inv=f"{rec['inv']:.3f}", equiv=f"{rec['equiv']:.3f}")
            if on_checkpoint is not None and step in checkpoints:
                rng = torch.get_rng_state()  # the evaluation must not change the rest of the training run
                backbone.eval()
                on_checkpoint(step, backbone)
                backbone.train()
                torch.set_rng_state(rng)
    if bar is not None:
        bar.close()
    backbone.eval()
    return Trained(backbone, cfg, history, time.perf_counter() - t0, step, ser, late)
