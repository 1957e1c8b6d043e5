"""Stand-ins for the names the docs' code blocks leave to the reader (their model, their loader, their loss).

Every page's python blocks run in one namespace made by :func:`namespace`: three 4-block timm ViTs at 32 px
(patch 8, width 32) named ``model``, ``vit`` and ``encoder``; ``head`` (a linear projection head), ``loader`` (two
batches of 8 images normalised with ImageNet's mean/std), ``images`` (8 images in [0, 1]), ``host_augment``,
``host_loss`` and ``n2`` (|b2| = 2), plus ``torch``. docs/getting-started.md names them for the reader.
"""

from __future__ import annotations

from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import nn

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_vit() -> nn.Module:
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=4,
                             num_heads=2, num_classes=0)


def namespace() -> Dict[str, Any]:
    torch.manual_seed(0)
    vit = tiny_vit()
    model, encoder = tiny_vit(), tiny_vit()  # three distinct models: a page may attach to each once
    head = nn.Linear(32, 16)
    g = torch.Generator().manual_seed(1)
    loader = [(torch.rand(8, 3, 32, 32, generator=g) - MEAN) / STD for _ in range(2)]

    def host_augment(x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)

    def host_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(head(a), head(b)).mean()

    return dict(torch=torch, model=model, vit=vit, encoder=encoder, head=head, loader=loader,
                images=torch.rand(8, 3, 32, 32, generator=g), host_augment=host_augment, host_loss=host_loss, n2=2)
