"""DINO with lightly's modules (timm ViT in ``MaskedVisionTransformerTIMM``) plus SER, in lightly's example style.

lightly's examples build the teacher with ``copy.deepcopy(student_backbone)``. Attach SER to the student
**after** the copy (as below). Attached before, the copy's hook is inert — a deep copy of the capture hook
records nothing, see :func:`inert_copy_demo` — so the result is the same, but attaching after keeps the teacher
free of any hook.

The matched 2-view budget of docs/method.md §7: the b2 views replace the last ``|b2|`` rows of the two global views,
so they also enter lightly's ``DINOLoss``; layer L is captured during the student's own passes over the two
global views (the first two passes of the step), so there is no extra encoder pass.

    python examples/lightly_dino.py --steps 5    # tiny CPU run: lightly's DINOTransform on scikit-image photos
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from ser_plugin import SER, SERConfig, attach_ser
from ser_plugin.integrations import add_ser_args, b2_count, b2_maps, config_from_args, loss_from_maps, recipe, replace_rows, views_input


def _default_ser() -> SERConfig:
    # the DINO recipe (lam 0.3, tau 0.5) at layer 2 of this 4-block ViT; a quarter of the batch of 16 as b2;
    # photometric=None: views are exact group transforms of the base (main() turns MoCo-v3 photometrics on)
    return recipe("dino", layer=2, b2_share=0.25, photometric=None)


@dataclass
class Config:
    img: int = 32
    local: int = 16
    patch: int = 8
    dim: int = 64
    depth: int = 4
    heads: int = 4
    out_dim: int = 256
    n_local: int = 2
    ser: SERConfig = field(default_factory=_default_ser)


class DINO(nn.Module):
    """Student and teacher as in lightly's DINO example (backbone + DINOProjectionHead, teacher = deepcopy)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        import timm
        from lightly.models.modules import DINOProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import deactivate_requires_grad

        vit = timm.create_model(
            "vit_small_patch16_224", pretrained=False, img_size=cfg.img, patch_size=cfg.patch, embed_dim=cfg.dim,
            depth=cfg.depth, num_heads=cfg.heads, num_classes=0, dynamic_img_size=True,
        )
        self.student_backbone = MaskedVisionTransformerTIMM(vit=vit)
        self.student_head = DINOProjectionHead(cfg.dim, 128, 32, cfg.out_dim, freeze_last_layer=1)
        self.teacher_backbone = copy.deepcopy(self.student_backbone)
        self.teacher_head = DINOProjectionHead(cfg.dim, 128, 32, cfg.out_dim)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x: Tensor) -> Tensor:
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x: Tensor) -> Tensor:
        return self.teacher_head(self.teacher_backbone(x))


def build(cfg: Config, **options: Any) -> Tuple[DINO, SER, Any, torch.optim.Optimizer]:
    """Model, SER handle, lightly's ``DINOLoss`` and the optimizer. SER's options: ``cfg.ser``, overridden by
    ``options`` (SERConfig fields, e.g. ``lam=0.0``)."""
    from lightly.loss import DINOLoss

    model = DINO(cfg)
    # after the deepcopy: the teacher never gets a hook. SER's parameters (none by default; head=True adds a token
    # head) live on the handle, outside the student, and go to the optimizer next to the model's.
    ser = attach_ser(model.student_backbone, config=cfg.ser, **options)
    criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp_epochs=0)
    params = [p for n, p in model.named_parameters() if not n.startswith("teacher_")] + list(ser.parameters())
    return model, ser, criterion, torch.optim.AdamW(params, lr=1e-3)


def lightly_transform(cfg: Config) -> Any:
    """lightly's own ``DINOTransform`` (2 global + ``n_local`` local crops, normalised), plus one plain uint8
    crop per image appended as the last item: the base of the b2 views."""
    from lightly.transforms import DINOTransform

    from ser_plugin.integrations import BaseCrop

    dino = DINOTransform(global_crop_size=cfg.img, local_crop_size=cfg.local, n_local_views=cfg.n_local)
    base = BaseCrop(cfg.img, (0.4, 1.0))  # DINOTransform's global crop scale
    return lambda image: list(dino(image)) + [base(image)]


def collate(samples: List[List[Tensor]]) -> Tuple[List[Tensor], Tensor]:
    """List of per-image crop lists → (list of view batches, base batch in [0, 1])."""
    views = [torch.stack(v) for v in zip(*[s[:-1] for s in samples])]
    return views, torch.stack([s[-1] for s in samples]).float().div_(255)


def make_views(x: Tensor, cfg: Config, generator: torch.Generator) -> List[Tensor]:
    """Stand-in for lightly's ``DINOTransform`` on an image batch: 2 global crops + ``n_local`` local crops."""
    views = []
    for size in [cfg.img] * 2 + [cfg.local] * cfg.n_local:
        i, j = (int(v) for v in torch.randint(0, x.shape[-1] - size + 1, (2,), generator=generator))
        v = x[..., i : i + size, j : j + size]
        views.append(v.flip(-1) if bool(torch.rand((), generator=generator) < 0.5) else v)
    return views


def train_step(model: DINO, ser: SER, criterion: Any, optimizer: torch.optim.Optimizer, views: List[Tensor], base: Tensor,
               cfg: Config, momentum: float = 0.996, step: bool = True) -> Dict[str, Any]:
    """One DINO step with SER. ``views``: lightly-style crops (2 global first); ``base``: the same images, [0, 1]."""
    from lightly.models.utils import update_momentum

    n = b2_count(base.shape[0], ser.config.b2_share)
    pair = ser.views(views_input(base[-n:], ser.config.mean, ser.config.std))
    views = list(views)
    views[0], views[1] = replace_rows(views[0], pair.x1), replace_rows(views[1], pair.x2)
    with torch.no_grad():
        teacher_out = [model.forward_teacher(v) for v in views[:2]]
    ser.clear()
    with ser.capture():  # the student's own passes; the first two are the global views
        student_out = [model(v) for v in views]
    caps = ser.captures
    ser.clear()
    host = criterion(teacher_out, student_out, epoch=0)
    f1, f2 = b2_maps(caps, n)  # the first two captures: the student's passes over the two global views
    term = loss_from_maps(ser, pair, f1, f2)
    loss = host + term
    if step:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        update_momentum(model.student_backbone, model.teacher_backbone, momentum)
        update_momentum(model.student_head, model.teacher_head, momentum)
    return {"loss": loss, "host": host, "term": term, "pair": pair, "views": views, "n_captures": len(caps)}


def inert_copy_demo(cfg: Config) -> Dict[str, int]:
    """Attach first, copy second: the copy's hook is inert — the teacher's passes record nothing."""
    model = DINO(cfg)
    ser = attach_ser(model.student_backbone, config=cfg.ser)
    teacher = copy.deepcopy(model.student_backbone)
    x = torch.rand(4, 3, cfg.img, cfg.img)
    with ser.capture():
        teacher(x)
        recorded_by_teacher = len(ser.captures)
        model.student_backbone(x)
        recorded_by_student = len(ser.captures) - recorded_by_teacher
    ser.remove()
    return {"teacher": recorded_by_teacher, "student": recorded_by_student}


def sample_images(n: int, size: int = 64) -> List[Any]:
    """Photos shipped with scikit-image (random crops of them), or noise if it is not installed."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    try:
        from skimage import data

        photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    except ImportError:
        photos = [(rng.random((256, 256, 3)) * 255).astype("uint8")]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        y, x = rng.integers(0, p.shape[0] - 128), rng.integers(0, p.shape[1] - 128)
        out.append(Image.fromarray(p[y : y + 128, x : x + 128]).resize((size, size)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    from ser_plugin.integrations import IMAGENET_MEAN, IMAGENET_STD

    # lightly's DINOTransform normalises with ImageNet statistics: the views get photometrics, then the same
    base = _default_ser().replace(photometric="mocov3", mean=IMAGENET_MEAN, std=IMAGENET_STD)
    add_ser_args(ap, base=base)
    args = ap.parse_args()
    cfg = Config(ser=config_from_args(args, base))
    torch.manual_seed(0)
    model, ser, criterion, opt = build(cfg)
    transform = lightly_transform(cfg)
    images = sample_images(args.batch * args.steps)
    loader = torch.utils.data.DataLoader([transform(im) for im in images], batch_size=args.batch, collate_fn=collate)
    for s, (views, base) in enumerate(loader):
        out = train_step(model, ser, criterion, opt, views, base, cfg)
        print(f"step {s}: loss {float(out['loss']):.4f} = DINO {float(out['host']):.4f} + {ser.lam} * L_equiv {float(ser.last_loss):.4f}")
        assert math.isfinite(float(out["loss"]))
    print("inert copy:", inert_copy_demo(cfg))


if __name__ == "__main__":
    main()
