"""The demo's backbone choice (``--backbone vit|resnet|convnext|swin``): small models for 24 px images.

Every factory returns a timm model whose pooled output has ``cfg.width`` channels (the projection heads are built
for it) and that ``attach_ser`` recognises with no extra argument. The non-ViT families use the layer convention of
:mod:`ser_plugin.backbones` (``layer=L`` is timm's ``forward_intermediates`` map ``L - 1``); ``DEPTH`` is their
number of layers and ``LAYER`` the default SER layer, a middle one: its map is 12x12 (ResNet layer 3, Swin layer 1)
or 6x6 (ConvNeXt layer 3; the ViT's 4-px patches also give 6x6 at 24 px).

* ``resnet``: timm ``ResNet`` with BasicBlocks (1, 1, 1, 1) and channels (16, 24, 32, width), the CIFAR stem
  (3x3 stride-1 ``conv1``, no max-pool, as solo-learn does for 32 px): layers 1..5 at strides 1, 1, 2, 4, 8.
* ``convnext``: timm ``ConvNeXt`` with a 1x1 stem, depths (1, 1, 1, 1), dims (16, 24, 32, width): strides 1, 2, 4, 8.
* ``swin``: timm ``SwinTransformer``, patch 2, window 3, embed 16, depths (2, 2), heads (2, 4): strides 2, 4
  (its pooled output has 32 channels, so the width is fixed by the family, see :func:`width_of`); built with
  ``dynamic_img_size=True`` so the protocol's scaled inputs run.
"""

from __future__ import annotations

from typing import Any, Dict

from torch import nn

FAMILIES = ("vit", "resnet", "convnext", "swin")
DEPTH: Dict[str, int] = {"resnet": 5, "convnext": 4, "swin": 2}
LAYER: Dict[str, int] = {"vit": 2, "resnet": 3, "convnext": 3, "swin": 1}


def width_of(family: str, width: int) -> int:
    """The pooled output width the family's factory gives for the requested ``width``."""
    return 32 if family == "swin" else width


def build_backbone(cfg: Any, in_chans: int) -> nn.Module:
    """The ``cfg.backbone`` model (not the ViT, which ``train.build_vit`` builds)."""
    fam = cfg.backbone
    if fam == "resnet":
        from timm.models.resnet import BasicBlock, ResNet

        net = ResNet(BasicBlock, (1, 1, 1, 1), num_classes=0, in_chans=in_chans, stem_width=16, channels=(16, 24, 32, cfg.width))
        net.conv1 = nn.Conv2d(in_chans, net.bn1.num_features, 3, 1, 1, bias=False)  # the CIFAR stem: keep 24 px at stride 1
        net.maxpool = nn.Identity()
        return net
    if fam == "convnext":
        from timm.models.convnext import ConvNeXt

        return ConvNeXt(in_chans=in_chans, num_classes=0, depths=(1, 1, 1, 1), dims=(16, 24, 32, cfg.width), patch_size=1)
    if fam == "swin":
        from timm.models.swin_transformer import SwinTransformer

        return SwinTransformer(img_size=cfg.img_size, patch_size=2, in_chans=in_chans, num_classes=0, window_size=3,
                               embed_dim=16, depths=(2, 2), num_heads=(2, 4), dynamic_img_size=True)
    raise ValueError(f"backbone must be one of {FAMILIES}, got {fam!r}")


def apply_backbone_defaults(args: Any) -> None:
    """CLI: the family's depth, pooled width and (unless ``--layer`` was given) its default SER layer."""
    fam = args.backbone
    if args.layer is None:
        args.layer = LAYER[fam]
    if fam != "vit":
        args.depth = DEPTH[fam]
        args.width = width_of(fam, args.width)
