"""Late [CLS] insertion (docs/method.md §5): blocks 1..L see patch tokens only; the raw prefix tokens
([CLS], registers, without positional embedding) are concatenated right after block L. Reversible."""

from __future__ import annotations

from typing import Any, List, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import SERError
from .tap import TapHook
from .vit import declared_prefix_tokens, find_blocks, iter_prefix_params, resolve_layer

__all__ = ["LateCLS", "convert_late_cls", "check_late_cls_layer"]


class _StripPrefix(TapHook):
    """Forward pre-hook on block 1: drops the ``p`` prefix tokens the embedding put in front."""

    def __init__(self, p: int) -> None:
        super().__init__(None, "late_cls", None, survives_copy=True)  # part of the architecture: copies keep it
        self.p = p

    def __call__(self, module: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (args[0][:, self.p :],) + tuple(args[1:])


class _InsertPrefix(TapHook):
    """Forward hook on block L: puts the raw prefix parameters back in front of the patch tokens."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        super().__init__(None, "late_cls", None, survives_copy=True)
        self.params = list(params)

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], output: Any) -> Any:
        x = output if isinstance(output, Tensor) else output[0]
        prefix = torch.cat([p.to(x.dtype).expand(x.shape[0], -1, -1) for p in self.params], dim=1)
        new = torch.cat([prefix, x], dim=1)
        return new if isinstance(output, Tensor) else (new,) + tuple(output[1:])


class LateCLS:
    """Handle of a late-[CLS] conversion; :meth:`remove` restores the stock ViT."""

    def __init__(self, handles: List[RemovableHandle], layer: int, num_prefix_tokens: int) -> None:
        self._handles = handles
        self.layer = layer
        self.num_prefix_tokens = num_prefix_tokens

    @property
    def is_active(self) -> bool:
        return bool(self._handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> LateCLS:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def check_late_cls_layer(layer: int, depth: int) -> None:
    """The late-[CLS] rule, stated once: [CLS] joins after block ``layer`` (``1..depth``), so that block must not be the last.

    Raises:
        SERError: ``layer`` is the last block (the [CLS] output would be the constant ``cls_token`` parameter).
    """
    if layer == depth:
        raise SERError(
            f"late_cls=True with layer {layer} = the last block of {depth}: [CLS] would join after the last block and stay "
            "the constant cls_token parameter. Choose a layer below the last block (paper: about a third of the depth) or late_cls=False."
        )


def convert_late_cls(model: nn.Module, layer: int, blocks: Union[None, str, Sequence[nn.Module]] = None) -> LateCLS:
    """Converts a timm or DINO/DINOv2-style ViT to late [CLS] insertion after block ``layer``.

    The embedding still builds ``[prefix, patches]``; a pre-hook on block 1 drops the prefix and a hook on
    block ``layer`` concatenates the raw ``cls_token`` (and register tokens) with no positional embedding.
    The model's parameters and state_dict are untouched; ``.remove()`` restores the stock forward.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", pretrained=False)
        >>> with convert_late_cls(vit, layer=3):
        ...     out = vit(torch.randn(1, 3, 224, 224))
    """
    blist = find_blocks(model, blocks)
    idx = resolve_layer(layer, len(blist))
    params = iter_prefix_params(model)
    p = declared_prefix_tokens(model)
    if not params or p is None or p != sum(int(t.shape[1]) for t in params):
        raise SERError(
            f"late [CLS] insertion supports timm and DINO/DINOv2-style ViTs (a cls_token parameter, optional "
            f"reg_token/register_tokens, declared prefix count) ; {type(model).__name__} has prefix parameters "
            f"{[tuple(t.shape) for t in params]} and declares {p} prefix tokens. Use late_cls=False."
        )
    check_late_cls_layer(idx + 1, len(blist))
    handles = [blist[0].register_forward_pre_hook(_StripPrefix(p)), blist[idx].register_forward_hook(_InsertPrefix(params))]
    return LateCLS(handles, idx + 1, p)

