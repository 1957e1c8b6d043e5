"""Backbones with a spatial map that are not plain ViTs: CNNs (ResNet, ConvNeXt) and hierarchical transformers (Swin).

SER needs one thing from a backbone: a layer whose output is a spatial map ``(B, C, h, w)`` on which the image
group acts by the analytic ρ_g. A ViT gives it as patch tokens; a CNN or a Swin gives it as the output of a
stage. This module recognises those families, fixes one layer convention per family and turns what the hooked
module returns into the ``(B, C, h, w)`` map:

* **The convention** is timm's ``forward_intermediates`` / ``feature_info`` one, for every family: ``layer=L``
  is the map timm returns at ``indices=[L - 1]`` (the ``L``-th entry of ``model.feature_info``), so the hook path
  (``attach_ser``) and the stateless path (``forward_intermediates`` feeding :class:`~ser_plugin.SERLoss`) see
  the same tensor. torchvision's ResNet / ConvNeXt / Swin are given the same layers as their timm twins.
  ``depth`` is the number of such layers. For a ViT it is unchanged: ``layer=L`` is the output of block ``L``.
* **The map**: NCHW outputs (ResNet, ConvNeXt) are taken as they are; NHWC outputs (Swin stages) are
  permuted to ``(B, C, h, w)``, a view of the same memory (no copy).
* **The stride** of layer ``L`` (its total downsampling) plays the part of a ViT's patch size: view sizes are
  multiples of it and the captured map must be ``(H / stride, W / stride)``.

A user's own CNN works through ``blocks=`` (its stages or blocks in order; ``layer=L`` is the output of the
``L``-th) and, where the forward needs it, ``forward=``; a 4-D block output is read as an NCHW map.

See docs/backbones.md for the table of families and what holds exactly for a CNN's strides and padding.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .capture import map_cells_match, tokens_to_map
from .errors import SERError
from .vit import BlocksArg, ViTDescription, _refuse_wrappers, declared_prefix_tokens, describe_vit, model_roots

__all__ = [
    "MapDescription",
    "describe_backbone",
    "describe_map_family",
    "at_layer",
    "resolve_model_layer",
    "block_map",
    "refuse_for_maps",
    "layer_meaning",
    "measured_layers",
]

LAYOUTS = ("NCHW", "NHWC")


@dataclass(frozen=True)
class MapDescription(ViTDescription):
    """A backbone whose layers output spatial maps (CNN stages, Swin stages), resolved once at attach.

    Besides the :class:`~ser_plugin.vit.ViTDescription` fields (``blocks`` are the modules whose outputs are the
    layers; ``patch_size`` is the stride of the chosen layer once :func:`at_layer` has been applied; ``width`` its
    channel count; ``num_prefix_tokens`` is 0):

    Attributes:
        family: e.g. ``"timm ResNet"``. layout: ``"NCHW"`` or ``"NHWC"`` (what the hooked modules return).
        layer_names: the dotted module name of each layer. strides: each layer's total stride (None: unknown).
        widths: each layer's channel count (None: unknown). borders: cells each layer's map has beyond
        ``side / stride`` (0 for every stock model; 2 for the first map of a stem padded by 2 more pixels than it
        needs, as solo-learn's CIFAR ResNet). (``layer``, inherited: the chosen layer, set by :func:`at_layer`.)
    """

    family: str = ""
    layout: str = "NCHW"
    layer_names: Tuple[str, ...] = ()
    strides: Tuple[Optional[int], ...] = ()
    widths: Tuple[Optional[int], ...] = ()
    borders: Tuple[int, ...] = ()

    def border(self, layer: int) -> int:
        """Cells layer ``layer``'s map has beyond ``side / stride`` (see ``borders``)."""
        return self.borders[layer - 1] if layer - 1 < len(self.borders) else 0

    def meaning(self, layer: int) -> str:
        """What ``layer`` (1-based) is in this model, e.g. ``"layer3 output (stride 16, 256 ch)"``."""
        i = layer - 1
        stride = self.strides[i] if i < len(self.strides) else None
        width = self.widths[i] if i < len(self.widths) else None
        b = self.border(layer)
        extra = ", ".join(x for x in (f"stride {stride}" if stride else "", f"{width} ch" if width else "",
                                      f"{b:+d} border cell{'s' if abs(b) != 1 else ''}" if b else "") if x)
        return f"{self.layer_names[i] or 'block ' + str(layer)} output" + (f" ({extra})" if extra else "")

    @property
    def convention(self) -> str:
        if self.family.endswith("(blocks=)"):
            return "layer L = output of blocks[L-1]"
        if self.family.startswith("torchvision"):
            return "layer L = map L of timm's forward_intermediates for this architecture"
        return "layer L = forward_intermediates(indices=[L-1]), feature_info[L-1]"

    def __repr__(self) -> str:
        layers = "; ".join(f"{i + 1}={self.meaning(i + 1)}" for i in range(self.depth))
        return (f"family={self.family}, {self.convention}, depth={self.depth} [{layers}], layout={self.layout}, "
                f"in_chans={self.in_chans}, other_sizes={self.accepts_other_sizes}")


# ---------------------------------------------------------------------------------------------- family recognition


def _from_torchvision(m: nn.Module) -> bool:
    return type(m).__module__.startswith("torchvision.")


def _timm_feature_layers(m: nn.Module) -> Optional[Tuple[str, List[Tuple[str, int, int]], str]]:
    """timm models with ``feature_info`` and ``forward_intermediates`` that are not token ViTs."""
    info = getattr(m, "feature_info", None)
    if not callable(getattr(m, "forward_intermediates", None)) or not isinstance(info, (list, tuple)) or not info:
        return None
    if not all(isinstance(f, dict) and {"module", "num_chs", "reduction"} <= set(f) for f in info):
        return None
    if declared_prefix_tokens(m) is not None or isinstance(getattr(m, "blocks", None), nn.ModuleList):
        return None  # a token ViT (timm VisionTransformer, Eva, ...): handled by ser_plugin.vit
    layout = "NHWC" if str(getattr(m, "output_fmt", "NCHW")) == "NHWC" else "NCHW"
    return f"timm {type(m).__name__}", [(str(f["module"]), int(f["num_chs"]), int(f["reduction"])) for f in info], layout


def _last_width(stage: nn.Module) -> Optional[int]:
    """Channel count at a torchvision ResNet stage's output (its last BatchNorm)."""
    bns = [b for b in stage.modules() if isinstance(b, nn.BatchNorm2d)]
    return bns[-1].num_features if bns else None


def _tv_resnet(m: nn.Module) -> Optional[Tuple[str, List[Tuple[str, int, int]], str]]:
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if not (_from_torchvision(m) and all(hasattr(m, n) for n in names)):
        return None
    layers = [("relu", m.bn1.num_features, 2)] + [(f"layer{i}", _last_width(getattr(m, f"layer{i}")), 2 ** (i + 1)) for i in range(1, 5)]
    return f"torchvision {type(m).__name__}", layers, "NCHW"


def _tv_features(m: nn.Module) -> Optional[Tuple[str, List[Tuple[str, int, int]], str]]:
    """torchvision ConvNeXt / SwinTransformer: ``features`` = [stem, stage, downsample, stage, ...]; the stage
    outputs ``features.1, .3, .5, .7`` are timm's ``stages.i`` / ``layers.i`` outputs."""
    feats = getattr(m, "features", None)
    name = type(m).__name__
    if not (_from_torchvision(m) and name in ("ConvNeXt", "SwinTransformer") and isinstance(feats, nn.Sequential)):
        return None
    stem = next(c for c in feats[0].modules() if isinstance(c, nn.Conv2d))
    stride = stem.stride[0]
    layers = []
    for i in range(1, len(feats), 2):
        widths = [c.normalized_shape[0] for c in feats[i].modules() if isinstance(c, nn.LayerNorm)]
        dw = [c.in_channels for c in feats[i].modules() if isinstance(c, nn.Conv2d)]
        layers.append((f"features.{i}", (dw or widths or [None])[-1], stride * 2 ** (i // 2)))
    return f"torchvision {name}", layers, "NHWC" if name == "SwinTransformer" else "NCHW"


_RECOGNISERS = (_timm_feature_layers, _tv_resnet, _tv_features)


def _other_sizes(root: nn.Module, family: str) -> bool:
    """CNNs take any input size; a timm Swin only when built with ``strict_img_size=False`` (its attention
    masks are built for one size); torchvision's Swin pads to its windows."""
    if "Swin" not in family:
        return True
    if family.startswith("torchvision"):
        return True
    pe = getattr(root, "patch_embed", None)
    return bool(getattr(root, "dynamic_img_size", False)) or getattr(pe, "strict_img_size", True) is False


def _probe_size(root: nn.Module) -> int:
    """An input side the model accepts: a timm Swin's fixed ``img_size``, else 224 (every stride divides it)."""
    size = getattr(getattr(root, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and size:
        return int(size[0])
    return int(size) if isinstance(size, int) else 224


def probe_layers(model: nn.Module, modules: Sequence[nn.Module], in_chans: int, size: int,
                 forward: Optional[Callable[[nn.Module, Tensor], Any]] = None) -> Optional[List[Tuple[int, ...]]]:
    """Output shapes of ``modules`` for one ``(1, in_chans, size, size)`` input, without computing anything: the
    forward runs on fake tensors (shapes only), every module in eval mode so no buffer is updated and without the
    model's own forward hooks, the training flags and hooks restored afterwards. The strides are read from these shapes, so a modified stem (CIFAR ResNets: a 3×3
    stride-1 ``conv1`` and no max-pool) is described as it is. None when the model cannot be run that way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    shapes: List[Optional[Tuple[int, ...]]] = [None] * len(modules)

    def recorder(i: int) -> Callable[..., None]:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            t = out if isinstance(out, Tensor) else (out[0] if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor) else None)
            if t is not None and shapes[i] is None:
                shapes[i] = tuple(int(d) for d in t.shape)
        return hook

    flags = [(m, m.training) for m in model.modules()]
    # the model's own hooks stay out of the fake pass (a user's logging hook would see fake tensors)
    saved = [(m, m._forward_hooks, m._forward_pre_hooks) for m in model.modules()]
    for m, _, _ in saved:
        m._forward_hooks, m._forward_pre_hooks = OrderedDict(), OrderedDict()
    handles = [m.register_forward_hook(recorder(i)) for i, m in enumerate(modules)]
    try:
        for m, _ in flags:
            m.training = False
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            x = torch.empty(1, in_chans, size, size)
            forward(model, x) if forward is not None else model(x)
    except Exception:  # noqa: BLE001 - a model that cannot run on fake tensors keeps its declared strides
        return None
    finally:
        for h in handles:
            h.remove()
        for m, fwd, pre in saved:
            m._forward_hooks, m._forward_pre_hooks = fwd, pre
        for m, t in flags:
            m.training = t
    return None if any(sh is None for sh in shapes) else shapes  # type: ignore[return-value]


def _measured(shapes: Optional[List[Tuple[int, ...]]], layout: str, size: int,
              shapes2: Optional[List[Tuple[int, ...]]] = None) -> Optional[Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
    """(strides, widths, border cells) from probed 4-D shapes at side ``size`` (and, if given, ``2 * size``).

    With the second probe the stride is read from the difference, ``size / (h(2·size) − h(size))``, so a stem whose
    padding adds pixels (solo-learn's CIFAR ResNet: a 3×3 stride-1 ``conv1`` with ``padding=2``, so an S-pixel
    image gives an (S + 2)-cell first map) is described as it runs: stride 1 with 2 border cells. The border is
    what the map has beyond ``size / stride`` at the probe size. None if the shapes are not 4-D or give no whole
    stride."""
    if shapes is None or any(len(sh) != 4 for sh in shapes):
        return None
    hw = [(sh[1], sh[3]) if layout == "NHWC" else (sh[2], sh[1]) for sh in shapes]
    if any(h < 1 for h, _ in hw):
        return None
    widths = tuple(c for _, c in hw)
    if shapes2 is not None and len(shapes2) == len(shapes) and all(len(sh) == 4 for sh in shapes2):
        hw2 = [sh[1] if layout == "NHWC" else sh[2] for sh in shapes2]
        steps = [h2 - h for h2, (h, _) in zip(hw2, hw)]
        if all(d > 0 and size % d == 0 for d in steps):
            strides = tuple(size // d for d in steps)
            return strides, widths, tuple(h - size // s for (h, _), s in zip(hw, strides))
    if any(size % h for h, _ in hw):
        return None
    return tuple(size // h for h, _ in hw), widths, (0,) * len(hw)


def _probe_twice(model: nn.Module, blocks: Sequence[nn.Module], in_chans: int, size: int, layout: str,
                 forward: Optional[Callable[[nn.Module, Tensor], Any]] = None):  # noqa: ANN202
    """:func:`_measured` from probes at ``size`` and ``2 * size`` (a model with one fixed input size: ``size`` only)."""
    first = probe_layers(model, blocks, in_chans, size, forward)
    second = probe_layers(model, blocks, in_chans, 2 * size, forward) if first is not None else None
    return first, _measured(first, layout, size, second)


def describe_map_family(model: nn.Module) -> Optional[MapDescription]:
    """The :class:`MapDescription` of a recognised map backbone (``model`` or a wrapped ``backbone`` / ``vit`` /
    ``base_encoder``), None if ``model`` is none of them.

    Raises:
        SERError: several recognised backbones inside one wrapper (ambiguous; names them).
    """
    found = []
    for root in model_roots(model):
        for recognise in _RECOGNISERS:
            got = recognise(root)
            if got is not None:
                found.append((root, got))
                break
    if not found:
        return None
    if len({id(r) for r, _ in found}) > 1:
        names = ", ".join(f"{g[0]} at {'<root>' if r is model else _path(model, r)!r}" for r, g in found)
        raise SERError(f"{type(model).__name__} holds several backbones SER recognises ({names}); attach to the one you "
                       "want to regularise, e.g. attach_ser(model.backbone, L), or pass blocks='...' naming its stages.")
    root, (family, layers, layout) = found[0]
    prefix = _path(model, root)
    names = tuple(f"{prefix}.{n}" if prefix else n for n, _, _ in layers)
    blocks = tuple(model.get_submodule(n) for n in names)
    conv = next((c for c in root.modules() if isinstance(c, nn.Conv2d)), None)
    in_chans = conv.in_channels if conv is not None else None
    strides, widths = tuple(s for _, _, s in layers), tuple(w for _, w, _ in layers)
    size = _probe_size(root)
    borders: Tuple[int, ...] = (0,) * len(layers)
    measured = _probe_twice(model, blocks, in_chans or 3, size, layout)[1]
    if measured is not None:  # what the model does, not what its class declares (a replaced stem changes the strides)
        strides, widths, borders = measured
    return MapDescription(blocks=blocks, blocks_path=None, patch_size=None, num_prefix_tokens=0, width=None,
                          in_chans=in_chans, accepts_other_sizes=_other_sizes(root, family),
                          family=family, layout=layout, layer_names=names, strides=strides, widths=widths, borders=borders)


def _path(model: nn.Module, sub: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is sub), "")


def _conv_candidates(model: nn.Module) -> List[str]:
    """Dotted names of containers holding convolutions: what a user could pass as ``blocks=``."""
    out = []
    for name, m in model.named_modules():
        if name and isinstance(m, (nn.Sequential, nn.ModuleList)) and len(m) > 1 and any(isinstance(c, nn.Conv2d) for c in m.modules()):
            if not any(name.startswith(o + ".") for o in out):
                out.append(name)
    return out[:6]


def _user_cnn(model: nn.Module, desc: ViTDescription, forward: Optional[Callable[[nn.Module, Tensor], Any]]) -> Optional[MapDescription]:
    """``blocks=`` modules that output 4-D maps (a user's CNN): their strides and widths, probed on fake tensors."""
    conv = next((c for c in model.modules() if isinstance(c, nn.Conv2d)), None)
    in_chans = desc.in_chans or (conv.in_channels if conv is not None else 3)
    for size in (224, 64, 32):
        shapes, measured = _probe_twice(model, desc.blocks, in_chans, size, "NCHW", forward)
        if shapes is not None:
            break
    if shapes is None or any(len(sh) != 4 for sh in shapes):
        return None
    strides, widths, borders = measured if measured is not None else ((None,) * len(shapes), tuple(sh[1] for sh in shapes), (0,) * len(shapes))
    names = tuple((f"{desc.blocks_path}.{i}" if desc.blocks_path else f"blocks[{i}]") for i in range(len(shapes)))
    return MapDescription(blocks=desc.blocks, blocks_path=desc.blocks_path, patch_size=desc.patch_size, num_prefix_tokens=0,
                          width=None, in_chans=in_chans, accepts_other_sizes=True, family=f"{type(model).__name__} (blocks=)",
                          layout="NCHW", layer_names=names, strides=strides, widths=widths, borders=borders)


def describe_backbone(model: nn.Module, blocks: BlocksArg = None, patch_size: Optional[int] = None,
                      num_prefix_tokens: Optional[int] = None, forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
                      layer: Optional[int] = None) -> ViTDescription:
    """What SER needs to know about ``model``: a :class:`MapDescription` for a recognised CNN / Swin, the
    :func:`~ser_plugin.vit.describe_vit` description otherwise (ViTs, and any model with ``blocks=`` given).

    With ``blocks=`` the given modules are the layers, whatever the family (a 4-D output is read as NCHW). With
    ``layer``, it is resolved against the depth and, for maps, the description carries that layer's stride as
    ``patch_size`` and its channels as ``width`` (:func:`at_layer`).

    Raises:
        SERError: as :func:`~ser_plugin.vit.describe_vit`; for models that are neither a ViT nor a recognised
            map backbone the message lists the families and the containers that could be passed as ``blocks=``.
    """
    _refuse_wrappers(model)
    if blocks is None:
        fam = describe_map_family(model)
        if fam is not None:
            if num_prefix_tokens:
                raise SERError(f"num_prefix_tokens={num_prefix_tokens}: {fam.family} outputs spatial maps, it has no prefix tokens; drop it.")
            if patch_size is not None:
                raise SERError(f"patch_size={patch_size}: {fam.family}'s layers have their own strides {fam.strides}; drop patch_size=.")
            return fam if layer is None else at_layer(fam, resolve_model_layer(fam, layer))
    try:
        desc = describe_vit(model, blocks, patch_size, num_prefix_tokens, layer=layer)
        if blocks is not None and not num_prefix_tokens:
            cnn = _user_cnn(model, desc, forward)
            if cnn is not None:
                return cnn if layer is None else at_layer(cnn, desc.layer - 1)  # type: ignore[operator]
        return desc
    except SERError as err:
        if blocks is not None or "no transformer blocks found" not in str(err):
            raise
        cands = _conv_candidates(model)
        raise SERError(
            f"{err} Nor is it a backbone family SER recognises (timm models with forward_intermediates and feature_info such as "
            "ResNet / ConvNeXt / Swin; torchvision ResNet / ConvNeXt / SwinTransformer; or the same inside a .backbone / .vit / "
            ".base_encoder attribute): for a CNN pass the modules whose outputs are the layers, in order, as blocks='path.to.stages' "
            "or blocks=[stage1, stage2, ...]" + (f"; containers with convolutions here: {', '.join(repr(c) for c in cands)}" if cands else "") + "."
        ) from None


# ---------------------------------------------------------------------------------------------- layer, map, refusals


def resolve_model_layer(desc: ViTDescription, layer: Any) -> int:
    """``layer`` (``1..depth`` or ``-depth..-1``) → 0-based index; for map backbones the error lists the layers."""
    from .vit import resolve_layer

    if not isinstance(desc, MapDescription):
        return resolve_layer(layer, desc.depth)
    try:
        return resolve_layer(layer, desc.depth)
    except SERError:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise
        listed = "; ".join(f"{i + 1} = {desc.meaning(i + 1)}" for i in range(desc.depth))
        raise SERError(f"layer={layer} is out of range for {desc.family}, which has {desc.depth} layers ({desc.convention}): "
                       f"{listed}. Valid: 1..{desc.depth} (or -{desc.depth}..-1).") from None


def at_layer(desc: ViTDescription, index: int) -> ViTDescription:
    """The description with the chosen layer's stride as ``patch_size`` and its channels as ``width`` (maps only)."""
    if not isinstance(desc, MapDescription):
        return desc
    s, w = desc.strides[index], desc.widths[index]
    if desc.patch_size is not None and s is not None and desc.patch_size != (s, s):
        raise SERError(f"patch_size={desc.patch_size[0]} but layer {index + 1} of {desc.family} has stride {s} (measured: an input of side S "
                       f"gives an S/{s} map); drop patch_size= (for a CNN it is the layer's stride, measured at attach).")
    if s is None and desc.patch_size is not None:
        s = desc.patch_size[0]
    return dataclasses.replace(desc, patch_size=(s, s) if s else None, width=w, layer=index + 1)


def layer_meaning(desc: ViTDescription, layer: int) -> str:
    """One phrase for ``repr(ser)``: what ``layer`` is in this model."""
    if isinstance(desc, MapDescription):
        return desc.meaning(layer)
    return f"output of transformer block {layer} of {desc.depth}"


def block_map(output: Tensor, hw: Optional[Tuple[int, int]], desc: ViTDescription, prefix: Optional[int], layer: int) -> Tensor:
    """A hooked module's output → the ``(B, C, h, w)`` map.

    3-D ``(B, N, C)`` tokens go through :func:`~ser_plugin.capture.tokens_to_map`; a 4-D NCHW map is taken as it
    is; an NHWC map (``desc.layout``) is permuted (a view, no copy). With the input size and the layer's stride
    known, the map's size is checked against ``H / stride``.

    Raises:
        SERError: a tensor of another rank, or a map whose size does not match the input size and stride.
    """
    layout = getattr(desc, "layout", "NCHW")
    if output.dim() == 3 and not isinstance(desc, MapDescription):
        return tokens_to_map(output, hw, desc.patch_size, prefix, layer)[0]
    if output.dim() != 4:
        raise SERError(f"layer {layer} produced a {tuple(output.shape)} tensor; SER needs (B, N, C) tokens or a (B, C, h, w) map "
                       f"({'NHWC (B, h, w, C) for this family' if layout == 'NHWC' else 'NCHW'}). Pass blocks= naming modules that output one.")
    fmap = output.permute(0, 3, 1, 2) if layout == "NHWC" else output
    patch = desc.patch_size
    if hw is not None and patch is not None:
        want = (hw[0] // patch[0], hw[1] // patch[1])
        b = desc.border(layer)
        if not map_cells_match(fmap.shape[-2:], want, b):
            border = f" plus the {b:+d} border cells measured at attach" if b else ""
            raise SERError(
                f"layer {layer}: the {layout} map is {tuple(output.shape)}, so {tuple(fmap.shape[-2:])} cells, but an input of {hw} at stride "
                f"{patch[0]} gives {want}{border}. Feed images whose sides are multiples of the stride (SER's views are) or check the layout"
                + (" (this family's layers are NHWC)" if layout == "NHWC" else "") + "."
            )
    return fmap


def refuse_for_maps(cfg: Any, desc: ViTDescription, model: nn.Module) -> None:
    """Options that need tokens, refused for map backbones before any hook is registered."""
    if not isinstance(desc, MapDescription):
        return
    if getattr(cfg, "late_cls", False):
        raise SERError(
            f"late_cls=True needs a [CLS] token, and {desc.family} has none: it pools its last map instead, so there is no "
            "token to hold out of the first L layers (and no patch/[CLS] split to protect). Use late_cls=False; the "
            "decoupling SER gives here is the layer itself — equivariance at layer L, invariance at the pooled output."
        )


def measured_layers(model: nn.Module, blocks: BlocksArg, patch_size: Optional[int]) -> Tuple[List[nn.Module], List[Tuple[int, int]], Optional[MapDescription]]:
    """Layers, per-layer strides and the map description for the measuring tools (``equivariance_score``,
    ``measure_equivariance``): a map family's feature layers, or a ViT's blocks with its patch size for all.

    Raises:
        SERError: blocks not found, or a stride / patch size that could not be determined (pass ``patch_size=``).
    """
    fam = describe_map_family(model) if blocks is None else None
    if fam is not None:
        if any(s is None for s in fam.strides):
            raise SERError(f"the strides of {fam.family}'s layers could not be determined.")
        return list(fam.blocks), [(int(s), int(s)) for s in fam.strides], fam  # type: ignore[arg-type]
    from .vit import detect_patch_size, find_blocks

    if blocks is not None and patch_size is None:  # a user's CNN: its measured strides
        desc = describe_backbone(model, blocks)
        if isinstance(desc, MapDescription) and all(s is not None for s in desc.strides):
            return list(desc.blocks), [(int(s), int(s)) for s in desc.strides], None  # type: ignore[arg-type]
    blist = find_blocks(model, blocks)
    psz = (patch_size, patch_size) if patch_size is not None else detect_patch_size(model)
    if psz is None:
        raise SERError("the patch size (or, for a CNN given by blocks=, the stride of the layers) could not be detected; pass patch_size=.")
    return blist, [psz] * len(blist), None


def map_of(output: Any, hw: Optional[Tuple[int, int]], stride: Tuple[int, int], fam: Optional[MapDescription], layer: int) -> Tensor:
    """:func:`block_map` for the measuring tools: ``fam`` None reads 3-D tokens (prefix inferred) or 4-D NCHW maps."""
    from .capture import block_tokens

    t = block_tokens(output)
    if fam is not None:
        return block_map(t, hw, dataclasses.replace(fam, patch_size=stride), 0, layer)
    if t.dim() == 4:
        return block_map(t, hw, MapDescription((), None, stride, 0, None, None, True), 0, layer)
    return tokens_to_map(t, hw, stride, None, layer)[0]


def family_table() -> Sequence[Tuple[str, str]]:
    """(family, what ``layer`` means) rows, as in docs/backbones.md."""
    return (
        ("timm ResNet", "1 = act1 (stem, stride 2), 2..5 = layer1..layer4 (strides 4, 8, 16, 32)"),
        ("timm ConvNeXt", "1..4 = stages.0..stages.3 (strides 4, 8, 16, 32)"),
        ("timm Swin", "1..n = layers.0..layers.n-1 (strides patch·1, 2, 4, ...; NHWC, permuted)"),
        ("torchvision ResNet", "1 = relu (stem), 2..5 = layer1..layer4, as timm ResNet"),
        ("torchvision ConvNeXt", "1..4 = features.1, .3, .5, .7, as timm ConvNeXt's stages"),
        ("torchvision SwinTransformer", "1..4 = features.1, .3, .5, .7 (NHWC), as timm Swin's layers"),
        ("blocks= (your CNN)", "1..len(blocks) = the outputs of the modules given, in order (NCHW)"),
    )
