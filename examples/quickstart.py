"""A complete SSL training loop with SER added: the README's example, runnable as it is.

A MoCo-v3-style step (two augmented views, InfoNCE between online predictions and momentum keys) on a tiny
timm ViT. SER adds: a b2 share of the batch made into two equivariant views that also enter the SSL loss
(matched 2-view budget), one capture block, one added loss term.

    python examples/quickstart.py --steps 20 [--ser-layer 3 --ser-lam 0.5 --ser-b2-share 0.1 ...]

SER's options are the ``--ser-*`` flags of ``SERConfig`` (the same names as ``attach_ser``'s keywords and every
launcher's flags); defaults: the library's, at layer 2 of this 4-block ViT.
"""

from __future__ import annotations

import argparse
import copy

import timm
import torch
import torch.nn.functional as F
from torch import nn

from ser_plugin import SERConfig, attach_ser
from ser_plugin.integrations import add_ser_args, config_from_args


def augment(x: torch.Tensor) -> torch.Tensor:
    """Stand-in for the host's usual views: random resized crop + flip (kornia)."""
    import kornia.augmentation as K

    aug = nn.Sequential(K.RandomResizedCrop(x.shape[-2:], scale=(0.3, 1.0)), K.RandomHorizontalFlip(), K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8))
    return aug(x)


def contrastive(q: torch.Tensor, k: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.t() / tau
    return F.cross_entropy(logits, torch.arange(len(q))) * 2 * tau


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--patch", type=int, default=4, help="patch size of the 32x32 toy ViT")
    base = SERConfig(layer=2)
    add_ser_args(ap, base=base)
    args = ap.parse_args(argv)
    cfg = config_from_args(args, base)
    torch.manual_seed(0)

    encoder = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=args.patch, embed_dim=64, depth=4, num_heads=2, num_classes=0)
    projector = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))
    predictor = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

    # 1) attach SER to the online encoder before the momentum copy is made: the copy's hook is inert
    ser = attach_ser(encoder, config=cfg)  # = attach_ser(encoder, layer=2, lam=1.0, tau=0.4) with the defaults
    momentum = copy.deepcopy(nn.Sequential(encoder, projector)).requires_grad_(False)
    online = nn.Sequential(encoder, projector)
    params = list(online.parameters()) + list(predictor.parameters()) + list(ser.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)

    images = torch.rand(512, 3, 32, 32)  # replace with your data (values in [0, 1])
    history = []
    for step in range(args.steps):
        x = images[torch.randint(0, len(images), (args.batch,))]
        n2 = max(2, int(cfg.b2_share * len(x)))
        b1, b2 = x[n2:], x[:n2]
        v1, v2 = augment(b1), augment(b1)
        pair = ser.views(b2)  # 2) two equivariant views of b2 and their group elements
        with ser.capture():  # 3) record layer L during the online passes on the SER views
            z_eq1, z_eq2 = online(pair.x1), online(pair.x2)
        z1, z2 = online(v1), online(v2)
        with torch.no_grad():
            m = 0.99
            for p_m, p_o in zip(momentum.parameters(), online.parameters()):
                p_m.mul_(m).add_(p_o.detach(), alpha=1 - m)
            k1, k2 = momentum(torch.cat([v1, pair.x1])), momentum(torch.cat([v2, pair.x2]))
        q1, q2 = predictor(torch.cat([z1, z_eq1])), predictor(torch.cat([z2, z_eq2]))
        ssl = contrastive(q1, k2) + contrastive(q2, k1)  # b2's views enter the SSL loss too
        loss = ssl + ser.loss(pair)  # 4) + λ·L_equiv
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append({"step": step, "ssl": ssl.item(), "l_equiv": ser.last_loss.item()})
        if step % 5 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  ssl {ssl.item():.3f}  L_equiv {ser.last_loss.item():.3f}")
    ser.remove()
    return {"history": history}


if __name__ == "__main__":
    main()
