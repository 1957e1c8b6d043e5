"""From a hooked forward pass to checked token maps: block output → ``(B, C, h, w)`` map, what the input was
(size, address, a small fingerprint), masked inputs refused, and the checks that the captures belong to a pair."""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from einops import rearrange
from torch import Tensor

from .errors import SERError
from .views import ViewPair
from .vit import declared_prefix_tokens, detect_patch_size, find_blocks, iter_prefix_params, model_roots, resolve_layer

__all__ = [
    "block_tokens",
    "tokens_to_map",
    "InputInfo",
    "inspect_input",
    "split_captures",
    "check_pair",
    "pairing_checks",
    "compiling",
    "input_address",
    # re-exported from .vit for older imports
    "model_roots",
    "find_blocks",
    "resolve_layer",
    "detect_patch_size",
    "declared_prefix_tokens",
    "iter_prefix_params",
]

#: forward keyword arguments that replace patch tokens by a mask token or drop them (iBOT, BEiT, MAE, lightly, HF)
MASK_ARGUMENTS = ("mask", "masks", "bool_masked_pos", "idx_mask", "idx_keep", "mask_token", "token_mask", "masked_indices")
#: fingerprint grid side: an ``8x8`` subsample of every channel of every image
_FP_SIDE = 8
#: below this per-image correlation (averaged over channels) a capture did not run on that view
_MIN_CORRELATION = 0.5


def block_tokens(output: Any) -> Tensor:
    """The hidden states of a block's output: a tensor, or the first entry of a tuple (HF ≤ 4.55)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise SERError(f"the hooked block returned {type(output).__name__}, not a (B, N, C) tensor; pass blocks= pointing at the transformer blocks.")


def tokens_to_map(tokens: Tensor, input_hw: Optional[Tuple[int, int]], patch: Optional[Tuple[int, int]], prefix: Optional[int], layer: int) -> Tuple[Tensor, int]:
    """``(B, N, C)`` block output → ``(B, C, h, w)`` map of the patch tokens (prefix removed) and the prefix count.

    Checks ``N == P + h·w`` with the grid from the input size and patch size when both are known, else
    from the declared prefix count and a square grid.

    Raises:
        SERError: the tokens do not form prefix + grid (the message names ``num_prefix_tokens=``).
    """
    if tokens.dim() != 3:
        raise SERError(f"layer {layer} produced a {tuple(tokens.shape)} tensor, expected (B, N, C) tokens.")
    n = tokens.shape[1]
    if input_hw is not None and patch is not None:
        h, w = input_hw[0] // patch[0], input_hw[1] // patch[1]
        p = n - h * w
        if input_hw[0] % patch[0] or input_hw[1] % patch[1] or p < 0 or (prefix is not None and p != prefix):
            raise SERError(
                f"layer {layer}: {n} tokens do not form prefix + grid: input {input_hw} with patch {patch} gives a "
                f"{h}x{w} grid ({h * w} tokens) and {prefix} prefix tokens ([CLS] + registers) are expected, so {p} are left. "
                f"If the prefix count is wrong, pass num_prefix_tokens={max(p, 0)} to attach_ser. Token masking or dropping "
                "(MAE, iBOT, I-JEPA), dynamic padding or an input size that is not a multiple of the patch size also break "
                "the grid; run SER passes unmasked, on patch-aligned views."
            )
    else:
        p = prefix if prefix is not None else 0
        side = math.isqrt(max(n - p, 0))
        if n - p <= 0 or side * side != n - p:
            if input_hw is None:
                raise SERError(
                    f"layer {layer}: {n} tokens with {p} prefix tokens are not a square grid, and the input size was not "
                    "seen: SER reads it where the model's root forward or its patch embedding (patch_embed, a Conv2d) "
                    "takes the images, and neither ran in this pass (a sub-entry point such as forward_features, or a "
                    "sub-module, on a model without a convolutional patch embedding?). Call the model itself (its root "
                    "forward) inside ser.capture(); if the prefix count is what is wrong, pass num_prefix_tokens= to attach_ser."
                )
            raise SERError(
                f"layer {layer}: {n} tokens with {p} prefix tokens are not a square grid and the patch size is unknown; "
                "pass patch_size= (and num_prefix_tokens=) to attach_ser so the grid can be derived from the input size."
            )
        h = w = side
    return rearrange(tokens[:, p:], "b (h w) c -> b c h w", h=h, w=w), p


def compiling() -> bool:
    """True while torch.compile traces (data pointers and tensor attributes are not available there)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None) or torch._dynamo.is_compiling
    return bool(fn())


def input_address(x: Tensor) -> Optional[int]:
    """``x.data_ptr()``, or None where there is none to compare (compiling, fake/meta/functorch tensors)."""
    if compiling() or type(x) is not torch.Tensor or x.device.type == "meta":
        return None
    try:
        return x.data_ptr()
    except RuntimeError:
        return None


def _fingerprint(x: Tensor) -> Tensor:
    """``(B, C, K)`` fp32 subsample of ``x`` (``K <= 64``), NaN/Inf zeroed."""
    sh, sw = max(1, x.shape[-2] // _FP_SIDE), max(1, x.shape[-1] // _FP_SIDE)
    return torch.nan_to_num(x.detach()[..., ::sh, ::sw].float(), 0.0, 0.0, 0.0).flatten(2)


@dataclass
class InputInfo:
    """What a recorded forward pass ran on: spatial size, data address and a weak reference to the input.

    The weak reference keeps no memory: while the captured map's autograd graph lives, the patch embedding
    keeps its input alive anyway; once it is gone (or the pass ran without autograd) the content check is skipped.
    """

    hw: Tuple[int, int]
    ptr: Optional[int] = None
    source: Optional[Callable[[], Optional[Tensor]]] = None


def inspect_input(args: Tuple[Any, ...], kwargs: Dict[str, Any], fingerprint: bool) -> Optional[InputInfo]:
    """The image batch of a forward call (first 4-D tensor), after refusing masked-input arguments.

    Raises:
        SERError: a mask argument (``mask``, ``masks``, ``bool_masked_pos``, ``idx_mask``, ...) or a boolean tensor argument.
    """
    for name in MASK_ARGUMENTS:
        if kwargs.get(name) is not None and kwargs.get(name) is not False:
            _refuse_mask(f"{name}=")
    if any(isinstance(a, Tensor) and a.dtype == torch.bool for a in args):
        _refuse_mask("a boolean tensor argument")
    x = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor) and v.dim() == 4), None)
    if x is None:
        return None
    source = weakref.ref(x) if fingerprint and not compiling() and type(x) is torch.Tensor else None
    return InputInfo((int(x.shape[-2]), int(x.shape[-1])), input_address(x), source)


def _refuse_mask(what: str) -> None:
    raise SERError(
        f"the forward got {what} while SER's capture was armed: mask-token replacement or token dropping (iBOT, BEiT, MAE, "
        "lightly idx_mask/idx_keep, HF bool_masked_pos) changes layer L's tokens, so the map no longer shows the view. Run the "
        "SER views' passes unmasked inside `with ser.capture():` (or ser.forward_loss(pair)), and the masked passes outside it."
    )


def split_captures(records: List[Tensor], inputs: List[Optional[InputInfo]], pair: Optional[ViewPair], layer: int) -> Tuple[Tensor, Tensor, List[Tuple[Optional[InputInfo], slice]]]:
    """(view 1, view 2) maps out of the captures: two passes, or one pass on both views concatenated.

    Returns:
        ``f1, f2`` and, per view, the input record and the rows of it that view occupied.

    Raises:
        SERError: not 2 captures nor one even capture of ``2n`` images.
    """
    shapes = [tuple(c.shape) for c in records]
    n = len(pair.g1) if pair is not None else None
    if len(records) == 2:
        return records[0], records[1], [(inputs[0], slice(None)), (inputs[1], slice(None))]
    if len(records) == 1 and records[0].shape[0] % 2 == 0 and (n is None or records[0].shape[0] == 2 * n):
        half = records[0].shape[0] // 2
        f1, f2 = records[0].chunk(2)
        return f1, f2, [(inputs[0], slice(0, half)), (inputs[0], slice(half, None))]
    raise SERError(
        f"ser.loss() needs layer {layer}'s maps of the two views: 2 captures (view 1 then view 2) or one capture of both "
        f"concatenated; got {len(records)} capture(s) with shapes {shapes}"
        + (" — run the views' forward passes inside `with ser.capture():`" if not records else "") + "."
    )


def map_cells_match(got: Sequence[int], want: Sequence[int], border: int = 0) -> bool:
    """A captured map's ``(h, w)`` against ``side / stride``: exact, or, for a layer whose stem pads more than its
    kernel needs (``border`` extra cells, see :class:`~ser_plugin.backbones.MapDescription`), that border ± 1 cell
    (the strided layers' rounding)."""
    lo, hi = (min(0, border) - 1, max(0, border) + 1) if border else (0, 0)
    return all(lo <= g - w <= hi for g, w in zip(got, want))


def check_pair(pair: ViewPair, f1: Tensor, f2: Tensor, patch: Optional[Tuple[int, int]], layer: int, border: int = 0) -> None:
    """Shapes of the pair, its elements and the two maps agree (``border``: cells a padded stem adds to the
    map beyond ``side / stride``, see :class:`~ser_plugin.backbones.MapDescription`).

    Raises:
        SERError: any disagreement, with the shapes.
    """
    if not isinstance(pair, ViewPair):
        raise SERError(f"expected the ViewPair returned by ser.views(...), got {type(pair).__name__}.")
    n = len(pair.g1)
    if len(pair.g2) != n or pair.x1.shape[0] != n or pair.x2.shape[0] != n:
        raise SERError(f"views and elements disagree: x1 {tuple(pair.x1.shape)}, x2 {tuple(pair.x2.shape)}, {len(pair.g1)} and {len(pair.g2)} elements.")
    if f1.shape[0] != n or f2.shape[0] != n:
        raise SERError(f"captured maps {tuple(f1.shape)}, {tuple(f2.shape)} do not match the {n} images of the views; capture exactly the two views' passes.")
    if patch is not None:
        for i, (x, f) in enumerate(((pair.x1, f1), (pair.x2, f2)), 1):
            grid = (x.shape[-2] // patch[0], x.shape[-1] // patch[1])
            if not map_cells_match(f.shape[-2:], grid, border):
                extra = f" plus {border:+d} border cells" if border else ""
                raise SERError(f"view {i} is {tuple(x.shape)} (grid {grid}{extra}) but its captured map is {tuple(f.shape)} at layer {layer}: captures out of order or not these views.")


def _correlation(a: Tensor, b: Tensor) -> Tensor:
    """Per-image Pearson correlation of two ``(B, C, K)`` fingerprints, averaged over channels with variance;
    invariant to per-channel normalisation ``(x - m) / s`` and to dtype round trips."""
    a, b = a - a.mean(-1, keepdim=True), b.to(a.device) - b.to(a.device).mean(-1, keepdim=True)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    ok = den > 1e-6 * (a.abs().amax(-1) * b.abs().amax(-1) * a.shape[-1] + 1e-12)
    corr = torch.where(ok, (a * b).sum(-1) / den.clamp_min(1e-30), torch.ones_like(den))
    return corr.mean(-1)


def pairing_checks(pair: ViewPair, views: Sequence[Tuple[Optional[InputInfo], slice]], layer: int) -> List[Tuple[Tensor, str]]:
    """Device-side checks that the captured passes ran on ``pair.x1`` / ``pair.x2`` (checked later in one sync).

    Swapped views are refused at once (input addresses). Then, per view, an 8x8 subsample of the input the
    pass ran on (still alive through the capture's autograd graph) is correlated with the view's: a pass on
    other images of the same shape — a stale batch, the host's own views — fails, a normalised or
    dtype-converted view passes. Passes whose input is gone (no autograd) are not checked.

    Returns:
        ``[(all_ok_flag, message), ...]`` to be checked by :class:`~ser_plugin.objective.SERLoss`.

    Raises:
        SERError: the two captures ran on view 2 then view 1.
    """
    (i1, s1), (i2, s2) = views
    a1, a2 = input_address(pair.x1), input_address(pair.x2)
    if i1 is not None and i2 is not None and i1 is not i2 and a1 is not None and a1 != a2 and (i1.ptr, i2.ptr) == (a2, a1):
        raise SERError(
            f"the captures ran on view 2 then view 1 (layer {layer}); ser.loss() takes them in order view 1, view 2: "
            "run model(pair.x1) before model(pair.x2) inside ser.capture(), or one pass on torch.cat([pair.x1, pair.x2])."
        )
    out = []
    for name, x, (info, rows) in (("pair.x1", pair.x1, (i1, s1)), ("pair.x2", pair.x2, (i2, s2))):
        seen = info.source() if info is not None and info.source is not None else None
        if seen is None or info.hw != tuple(x.shape[-2:]) or compiling():  # type: ignore[union-attr]
            continue
        fp = _fingerprint(seen[rows])
        ref = _fingerprint(x)
        if fp.shape != ref.shape:
            continue
        corr = _correlation(fp, ref)
        out.append((
            (corr >= _MIN_CORRELATION).all(),
            f"the pass captured as view {name[-1]} at layer {layer} ran on other images, not {name}: its input does "
            f"not match the view (per-image correlation of an {_FP_SIDE}x{_FP_SIDE} subsample below {_MIN_CORRELATION}; per-channel "
            f"normalisation and dtype conversion are allowed). Run model({name}) (or model(torch.cat([pair.x1, pair.x2]))) inside "
            "`with ser.capture():` for the same pair you give ser.loss(pair).",
        ))
    return out
