"""Equivariance score: how well ρ_g(F_L(x)) predicts F_L(g·x), per layer — the one-number summary of the
measurement protocol (:func:`ser_plugin.protocol.measure_equivariance`), which computes it."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

from torch import Tensor, nn

from .protocol import measure_equivariance
from .vit import find_blocks, resolve_layer

__all__ = ["equivariance_score"]


def equivariance_score(
    model: nn.Module,
    x: Tensor,
    layers: Union[None, int, Sequence[int]] = None,
    *,
    blocks: Union[None, str, Sequence[nn.Module]] = None,
    patch_size: Optional[int] = None,
    forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
) -> Dict[int, Dict[str, float]]:
    """Mean cosine similarity between ``ρ_g(F_L(x))`` and ``F_L(g·x)`` over tokens, images and the 7 non-identity
    D4 elements, per layer.

    A thin summary of :func:`~ser_plugin.protocol.measure_equivariance` (``scales=()``, no controls):
    ``measure_equivariance(model, x, layers=layers, scales=(), controls=False).score()``, keyed by the layers as
    given. Two figures per layer (docs/method.md §8): ``raw`` and ``centred`` (each map's mean token subtracted per
    image and channel first — the raw score has a high floor from background and the shared mean). The model runs
    in eval mode (restored afterwards) under no_grad; prefix tokens are removed per layer.

    Args:
        model: the ViT. x: ``(B, C, H, W)`` square, patch-aligned images (already normalised as the model expects).
        layers: one layer, several, or None for all ``1..depth`` (negative counts from the end).
        blocks, patch_size, forward: as in :func:`~ser_plugin.protocol.measure_equivariance`.

    Returns:
        ``{layer: {"raw": float, "centred": float}}``.

    Raises:
        SERError: as :func:`~ser_plugin.protocol.measure_equivariance` (bad images, a layer out of range, ...).
    """
    res = measure_equivariance(model, x, scales=(), controls=False, blocks=blocks, patch_size=patch_size, forward=forward, layers=layers)
    by_block = res.score()
    if layers is None:
        return by_block
    depth = len(find_blocks(model, blocks))
    return {L: by_block[resolve_layer(L, depth) + 1] for L in ([layers] if isinstance(layers, int) else list(layers))}
