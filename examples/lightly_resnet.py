"""SimCLR on a ResNet-18 with lightly's modules plus SER, in lightly's example style.

The backbone is torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 ``conv1``, no max-pool) and no
classifier, held as ``model.backbone`` as lightly's examples do; ``attach_ser(model, layer=3)`` finds it and hooks
``layer2`` (stride 2 with this stem: a 16x16 map at 32 px; ``print(ser)`` lists every layer). The matched 2-view
budget of docs/method.md §7: the b2 views replace the last ``|b2|`` rows of SimCLR's two views, so they also enter
lightly's ``NTXentLoss``, and layer L is captured during those same passes (no extra encoder pass).

    python examples/lightly_resnet.py --steps 5    # tiny CPU run on scikit-learn digits at 32 px
"""

from __future__ import annotations

import argparse
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ser_plugin import attach_ser


class SimCLR(nn.Module):
    """lightly's SimCLR model: ``backbone`` then ``SimCLRProjectionHead``."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision
        from lightly.models.modules import SimCLRProjectionHead

        resnet = torchvision.models.resnet18()
        resnet.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # CIFAR stem
        resnet.maxpool = nn.Identity()
        resnet.fc = nn.Identity()
        self.backbone = resnet
        self.projection_head = SimCLRProjectionHead(512, 512, 128)

    def forward(self, x: Tensor) -> Tensor:
        return self.projection_head(self.backbone(x))


def digits(n: int, size: int = 32) -> Tensor:
    """scikit-learn's 8x8 digits, upsampled to ``size`` px, 3 channels, in [0, 1] (no download)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n], dtype=torch.float32)[:, None] / 16
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)


def simclr_views(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random resized crop (scale 0.5-1) and brightness jitter per image: SimCLR's host views, kept small."""
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        s = float(torch.empty(1).uniform_(0.5, 1.0, generator=gen)) ** 0.5
        ch, cw = max(8, int(h * s)), max(8, int(w * s))
        top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
        crop = x[i : i + 1, :, top : top + ch, left : left + cw]
        out.append(F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False))
    b = torch.empty(n, 1, 1, 1).uniform_(0.8, 1.2, generator=gen)
    return (torch.cat(out) * b).clamp(0, 1)


def train(steps: int = 5, batch: int = 16, b2_share: float = 0.25, layer: int = 3, lam: float = 1.0, seed: int = 0) -> List[Dict[str, float]]:
    from lightly.loss import NTXentLoss

    torch.manual_seed(seed)
    model = SimCLR()
    ser = attach_ser(model, layer=layer, lam=lam, photometric=None)  # the one line: finds model.backbone, hooks layer2
    print(ser)
    criterion = NTXentLoss(temperature=0.5)
    opt = torch.optim.SGD(list(model.parameters()) + list(ser.parameters()), lr=0.06, momentum=0.9)
    data = digits(256)
    gen = torch.Generator().manual_seed(seed)
    n2 = max(2, round(b2_share * batch))
    history = []
    for step in range(steps):
        x = data[torch.randint(0, len(data), (batch,), generator=gen)]
        x0, x1 = simclr_views(x, gen), simclr_views(x, gen)
        pair = ser.views(x[-n2:], generator=gen)  # SER's two equivariant views of the last n2 images
        x0 = torch.cat([x0[:-n2], pair.x1])  # matched budget: they replace those rows of SimCLR's two views
        x1 = torch.cat([x1[:-n2], pair.x2])
        with ser.capture():
            z0, z1 = model(x0), model(x1)
        f1, f2 = [f[-n2:] for f in ser.captures]  # layer L's maps of the b2 rows
        ser.clear()
        inv = criterion(z0, z1)
        equiv = ser.loss_from_maps(pair, f1, f2)
        loss = inv + equiv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"step": step, "inv": float(inv.detach()), "equiv": float(equiv.detach())})
        print(f"step {step}: NT-Xent {history[-1]['inv']:.4f}  lam*L_equiv {history[-1]['equiv']:.4f}", flush=True)
    ser.remove()
    return history


def main(argv=None) -> List[Dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--layer", type=int, default=3, help="SER layer (torchvision ResNet: 1 = stem, 2..5 = layer1..layer4)")
    p.add_argument("--lam", type=float, default=1.0)
    args = p.parse_args(argv)
    return train(args.steps, args.batch, layer=args.layer, lam=args.lam)


if __name__ == "__main__":
    main()
