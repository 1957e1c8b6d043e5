"""SER without hooks: timm's ``forward_intermediates`` feeding the stateless ``SERLoss``, in a lightly-style loop.

Two recipes for code that would rather not have hooks on its model:

1. :func:`layer_maps` — the layer-L token map of a timm ViT from ``forward_intermediates(x, indices=[L - 1],
   stop_early=True, intermediates_only=True)``: the residual stream after block L (timm counts blocks from 0),
   prefix tokens removed, ``(n, C, h, w)``, blocks above L skipped. It equals what ``attach_ser`` captures
   (``tests/test_adapter_stateless.py`` checks maps, losses and gradients).
2. :func:`train` — a SimCLR loop written the way lightly's examples are (``SimCLRProjectionHead``,
   ``NTXentLoss``, every option in the criterion's constructor) with SER added as one more criterion:
   ``ser_criterion = SERLoss(config, dim=width)`` and ``loss = ntxent(z0, z1) + ser_criterion(f1, f2, pair)``,
   where ``pair`` comes from the stateless view policy ``EquivariantViews`` and ``f1``, ``f2`` from
   :func:`layer_maps` on the pair's two views (an extra pass on the ``b2`` images, stopping after block L).

    python examples/stateless.py --steps 10 [--ser-lam 0.5 --ser-head ...]
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ser_plugin import EquivariantViews, SERConfig, SERError, SERLoss
from ser_plugin.integrations import add_ser_args, b2_count, config_from_args, recipe

#: this example's SER settings: the library defaults at layer 2 of the tiny 4-block ViT, views without
#: photometrics (the SimCLR views already have them), b2 = a quarter of the batch of 16
DEFAULTS = recipe(None, layer=2, photometric=None)


def layer_maps(vit: nn.Module, x: Tensor, layer: int) -> Tensor:
    """Layer-``layer`` token map of a timm ViT, without hooks.

    Args:
        vit: a timm ``VisionTransformer`` (``dynamic_img_size=True`` for scale views).
        x: images ``(n, 3, H, W)``.
        layer: ``L`` (1..depth), the output of the first L blocks — timm's ``indices=[L - 1]``.

    Returns:
        ``(n, C, H / patch, W / patch)``: the residual stream after block L, prefix tokens ([CLS], registers)
        removed, not normalised.

    Raises:
        SERError: ``layer`` outside ``1..depth``.
    """
    depth = len(vit.blocks)
    if not 1 <= layer <= depth:
        raise SERError(f"layer={layer} is out of range for a ViT with {depth} blocks; valid: 1..{depth}.")
    (maps,) = vit.forward_intermediates(x, indices=[layer - 1], stop_early=True, intermediates_only=True)
    return maps


def views_for(config: SERConfig, patch_size: int) -> EquivariantViews:
    """The stateless view policy of ``config`` (D4 per sample, optional scale and photometrics)."""
    return EquivariantViews(
        patch_size=patch_size, rotations=config.rotations, flips=config.flips, scale=config.scale, ratio=config.ratio,
        photometric=config.photometric, mean=config.mean, std=config.std,
    )


class SimCLR(nn.Module):
    """lightly's SimCLR example, with a tiny timm ViT as the backbone."""

    def __init__(self, width: int = 64, depth: int = 4, patch: int = 8, img: int = 32) -> None:
        super().__init__()
        import timm
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = timm.create_model(
            "vit_tiny_patch16_224", img_size=img, patch_size=patch, embed_dim=width, depth=depth, num_heads=2, num_classes=0,
            dynamic_img_size=True,
        )
        self.projection_head = SimCLRProjectionHead(width, 128, 64)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))


def augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """Stand-in for lightly's ``SimCLRTransform`` on a tensor batch: random crop + flip + brightness."""
    size = x.shape[-1] - 8
    i, j = (int(v) for v in torch.randint(0, 9, (2,), generator=generator))
    v = x[..., i : i + size, j : j + size]
    v = torch.nn.functional.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=False)
    if bool(torch.rand((), generator=generator) < 0.5):
        v = v.flip(-1)
    return (v * (0.6 + 0.8 * torch.rand(x.shape[0], 1, 1, 1, generator=generator))).clamp(0, 1)


def train(steps: int = 10, batch: int = 16, config: Optional[SERConfig] = None, seed: int = 0) -> Dict[str, Any]:
    """lightly-style SimCLR + SER; returns the model, the criteria and the per-step losses."""
    from lightly.loss import NTXentLoss

    config = config if config is not None else DEFAULTS
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SimCLR()
    criterion = NTXentLoss(temperature=0.5)
    ser_criterion = SERLoss(config, dim=64)  # lightly-style: every option in the constructor; the head (if any) inside
    views = views_for(config, patch_size=8)
    optimizer = torch.optim.SGD([*model.parameters(), *ser_criterion.parameters()], lr=0.06)
    images = torch.rand(8 * batch, 3, 32, 32, generator=g)  # replace with your loader (values in [0, 1])
    history: List[Dict[str, float]] = []
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=g)]
        x0, x1 = augment(x, g), augment(x, g)
        z0, z1 = model(x0), model(x1)
        ssl = criterion(z0, z1)
        n = b2_count(batch, config.b2_share)
        pair = views(x[-n:], generator=g)
        f1, f2 = layer_maps(model.backbone, pair.x1, config.layer), layer_maps(model.backbone, pair.x2, config.layer)
        loss = ssl + ser_criterion(f1, f2, pair)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"step": step, "ssl": float(ssl.detach()), "l_equiv": float(ser_criterion.last_loss)})
    return {"model": model, "ser_criterion": ser_criterion, "views": views, "history": history}


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    add_ser_args(ap, base=DEFAULTS)
    args = ap.parse_args(argv)
    out = train(args.steps, args.batch, config_from_args(args, DEFAULTS))
    for h in out["history"]:
        print(f"step {h['step']:3d}  NT-Xent {h['ssl']:.3f}  L_equiv {h['l_equiv']:.3f}")
    return out


if __name__ == "__main__":
    main()
