"""Equivariance score: how well ρ_g(F_L(x)) predicts F_L(g·x), per layer."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import map_of, measured_layers
from .capture import InputInfo
from .errors import SERError
from .group import D4_ELEMENTS, GroupElement, act_image, rho
from .tap import LayerTap
from .vit import resolve_layer

__all__ = ["equivariance_score"]


@torch.no_grad()
def equivariance_score(
    model: nn.Module,
    x: Tensor,
    layers: Union[None, int, Sequence[int]] = None,
    *,
    blocks: Union[None, str, Sequence[nn.Module]] = None,
    patch_size: Optional[int] = None,
    elements: Optional[Sequence[tuple]] = None,
    forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
) -> Dict[int, Dict[str, float]]:
    """Mean cosine similarity between ``ρ_g(F_L(x))`` and ``F_L(g·x)`` over tokens, images and ``g ≠ e``.

    Two figures per layer (docs/method.md §8): ``raw`` and ``centred`` (each map's mean token subtracted per
    image and channel first — the raw score has a high floor from background and the shared mean).
    The model runs in eval mode (restored afterwards) under no_grad; prefix tokens are removed per layer.

    Args:
        model: the ViT. x: ``(B, C, H, W)`` square, patch-aligned images (already normalised as the model expects).
        layers: one layer, several, or None for all ``1..depth``.
        elements: D4 elements ``(rot, flip)`` to average over (default: the 7 non-identity ones).
    Returns:
        ``{layer: {"raw": float, "centred": float}}``.
    """
    blist, strides, fam = measured_layers(model, blocks, patch_size)  # ViT blocks, or a CNN / Swin's layers (ser_plugin.backbones)
    depth = len(blist)
    wanted = list(range(1, depth + 1)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    idx = {L: resolve_layer(L, depth) for L in wanted}
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise SERError(f"equivariance_score needs square images (B, C, H, H) so quarter turns keep the shape, got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}.")
    els = [e for e in D4_ELEMENTS if e != (0, 0)] if elements is None else list(elements)
    order = sorted(wanted, key=lambda L: idx[L])

    def to_map(tokens: Tensor, info: Optional[InputInfo], layer: int) -> Tensor:
        return map_of(tokens, info.hw if info is not None else None, strides[layer - 1], fam, layer).float()

    # the same tap as SER's capture; SER handles on this model record nothing while the score runs
    tap = LayerTap(model, {L: blist[idx[L]] for L in order}, to_map, fingerprints=False)
    was_training = model.training
    model.eval()
    run: Callable[[Tensor], Any] = (lambda t: forward(model, t)) if forward is not None else model

    def maps(inp: Tensor) -> Dict[int, Tensor]:
        sink, _ = tap.collect(model, lambda: run(inp))
        if len(sink) != len(order):
            raise SERError(f"the forward pass ran {len(sink)} of the {len(order)} hooked blocks; pass forward= if the model needs a custom call.")
        return dict(zip(order, sink))

    try:
        base = maps(x)
        sums: Dict[int, List[float]] = {L: [0.0, 0.0] for L in wanted}
        for k, f in els:
            g = GroupElement.from_d4([k] * x.shape[0], [f] * x.shape[0], device=x.device)
            moved = maps(act_image(x, g))
            for L in wanted:
                pred, tgt = rho(base[L], g), moved[L]
                sums[L][0] += F.cosine_similarity(pred, tgt, dim=1).mean().item()
                pc = pred - pred.mean(dim=(2, 3), keepdim=True)
                tc = tgt - tgt.mean(dim=(2, 3), keepdim=True)
                sums[L][1] += F.cosine_similarity(pc, tc, dim=1).mean().item()
    finally:
        tap.remove()
        model.train(was_training)
    return {L: {"raw": s[0] / len(els), "centred": s[1] / len(els)} for L, s in sums.items()}
