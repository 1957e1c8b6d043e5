"""Finding a ViT's blocks, its patch size and prefix tokens, and turning a block output into a token map."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from .errors import SERError

__all__ = ["model_roots", "find_blocks", "resolve_layer", "detect_patch_size", "declared_prefix_tokens", "block_tokens", "tokens_to_map", "InputSizeRecorder"]

_BLOCK_LIST_NAMES = ("blocks", "layers", "layer")


def _get_path(model: nn.Module, path: str) -> Any:
    obj: Any = model
    for part in path.split("."):
        if part == "":
            continue
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            obj = obj[int(part)]
        elif hasattr(obj, part):
            obj = getattr(obj, part)
        else:
            raise SERError(f"blocks={path!r}: {type(obj).__name__} has no attribute {part!r}; pass the dotted path of the model's block list (e.g. 'blocks' or 'encoder.layer').")
    return obj


def _flatten_chunks(blocks: Sequence[nn.Module]) -> List[nn.Module]:
    """DINOv2 chunked layout: ``blocks[c]`` is a BlockChunk (a ModuleList padded with Identity)."""
    out: List[nn.Module] = []
    for b in blocks:
        if isinstance(b, nn.ModuleList):
            out.extend(m for m in b if not isinstance(m, nn.Identity))
        else:
            out.append(b)
    return out


def find_blocks(model: nn.Module, blocks: Union[None, str, Sequence[nn.Module]] = None) -> List[nn.Module]:
    """The model's transformer blocks in order.

    Recognises timm / DINO / DINOv2 (``blocks``, chunked included), torchvision (``encoder.layers``),
    HF transformers ViT (``encoder.layer`` or ``layers``) and wrappers around them (lightly's
    ``vit.blocks``, ``backbone.blocks``, ...): the shortest-path ModuleList/Sequential named blocks,
    layers or layer whose children share one class.

    Args:
        blocks: a dotted path (``"encoder.layer"``) or the list of block modules, to skip detection.
    """
    if blocks is not None:
        if not isinstance(blocks, (str, nn.Module, list, tuple)):
            raise SERError(f"blocks must be a dotted path like 'blocks' or a list of block modules, got {blocks!r}.")
        found = _get_path(model, blocks) if isinstance(blocks, str) else blocks
        if isinstance(found, nn.Module) and not isinstance(found, (nn.ModuleList, nn.Sequential)):
            raise SERError(f"blocks={blocks!r} resolves to a {type(found).__name__}, not a list of blocks (ModuleList/Sequential).")
        lst = _flatten_chunks(list(found))
        if not lst or not all(isinstance(b, nn.Module) for b in lst):
            raise SERError(f"blocks={blocks!r} holds no modules.")
        return lst
    candidates = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _BLOCK_LIST_NAMES and isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) > 0:
            flat = _flatten_chunks(list(mod))
            kinds = {type(b) for b in flat}
            if flat and len(kinds) == 1:
                candidates.append((name.count("."), name, flat))
    if not candidates:
        raise SERError(
            f"no transformer blocks found in {type(model).__name__}: looked for a ModuleList/Sequential named "
            f"{'/'.join(_BLOCK_LIST_NAMES)} with blocks of one class. Pass them explicitly: "
            "attach_ser(model, layer, blocks='path.to.blocks') or blocks=list_of_modules."
        )
    candidates.sort(key=lambda c: c[0])
    best = [c for c in candidates if c[0] == candidates[0][0]]
    if len(best) > 1:
        names = ", ".join(repr(c[1]) for c in best)
        raise SERError(f"several block lists found in {type(model).__name__} ({names}); choose one with blocks='...'.")
    return best[0][2]


def resolve_layer(layer: int, depth: int) -> int:
    """``layer`` in ``1..depth`` (or ``-depth..-1`` counted from the end) → index of block ``B_layer``."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SERError(f"layer must be an int (the output of the first `layer` blocks), got {layer!r}.")
    if 1 <= layer <= depth:
        return layer - 1
    if -depth <= layer <= -1:
        return depth + layer
    raise SERError(f"layer={layer} is out of range for a ViT with {depth} blocks; valid: 1..{depth} (or -{depth}..-1).")


def _as_hw(p: Any) -> Optional[Tuple[int, int]]:
    if p is None:
        return None
    if isinstance(p, int):
        return (p, p)
    if isinstance(p, (tuple, list)) and len(p) == 2:
        return (int(p[0]), int(p[1]))
    return None


def model_roots(model: nn.Module) -> List[nn.Module]:
    """The model and the wrapped ViT inside common wrappers (lightly ``vit``, ``backbone``, MoCo ``base_encoder``)."""
    roots = [model] + [getattr(model, name, None) for name in ("vit", "backbone", "base_encoder")]
    return [r for r in roots if isinstance(r, nn.Module)]


def detect_patch_size(model: nn.Module) -> Optional[Tuple[int, int]]:
    """Patch size of timm/DINO/DINOv2/torchvision/HF ViTs and wrappers (``vit``, ``backbone``); None if unknown."""
    for root in model_roots(model):
        for getter in (
            lambda m: getattr(getattr(m, "patch_embed", None), "patch_size", None),
            lambda m: getattr(m, "patch_size", None),
            lambda m: getattr(getattr(m, "config", None), "patch_size", None),
            lambda m: getattr(getattr(getattr(m, "embeddings", None), "patch_embeddings", None), "patch_size", None),
        ):
            hw = _as_hw(getter(root))
            if hw is not None:
                return hw
    return None


def declared_prefix_tokens(model: nn.Module) -> Optional[int]:
    """Prefix tokens ([CLS] + registers) the model declares, if it does."""
    for root in model_roots(model):
        if isinstance(getattr(root, "num_prefix_tokens", None), int):  # timm, lightly
            return root.num_prefix_tokens
        if hasattr(root, "num_register_tokens") and hasattr(root, "cls_token"):  # DINOv2
            return 1 + int(root.num_register_tokens)
        if isinstance(getattr(root, "class_token", None), nn.Parameter):  # torchvision
            return 1
        if hasattr(getattr(root, "embeddings", None), "cls_token"):  # HF
            return 1
        if isinstance(getattr(root, "cls_token", None), nn.Parameter):  # DINO-style
            return 1
    return None


def block_tokens(output: Any) -> Tensor:
    """The hidden states of a block's output: a tensor, or the first entry of a tuple (HF ≤ 4.55)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    raise SERError(f"the hooked block returned {type(output).__name__}, not a (B, N, C) tensor; pass blocks= pointing at the transformer blocks.")


def tokens_to_map(
    tokens: Tensor,
    input_hw: Optional[Tuple[int, int]],
    patch: Optional[Tuple[int, int]],
    prefix: Optional[int],
    layer: int,
) -> Tuple[Tensor, int]:
    """``(B, N, C)`` block output → ``(B, C, h, w)`` map of the patch tokens (prefix removed) and the prefix count.

    Checks ``N == P + h·w`` with the grid from the input size and patch size when both are known, else
    from the declared prefix count and a square grid.
    """
    if tokens.dim() != 3:
        raise SERError(f"layer {layer} produced a {tuple(tokens.shape)} tensor, expected (B, N, C) tokens.")
    b, n, c = tokens.shape
    if input_hw is not None and patch is not None:
        h, w = input_hw[0] // patch[0], input_hw[1] // patch[1]
        p = n - h * w
        if input_hw[0] % patch[0] or input_hw[1] % patch[1] or p < 0 or (prefix is not None and p != prefix):
            raise SERError(
                f"layer {layer}: {n} tokens do not form prefix + grid: input {input_hw} with patch {patch} gives a "
                f"{h}x{w} grid ({h * w} tokens) and the model declares {prefix} prefix tokens. Token masking (MAE, iBOT, "
                "I-JEPA), dynamic padding or an input size that is not a multiple of the patch size break the grid; "
                "run SER passes unmasked, on patch-aligned views."
            )
    else:
        p = prefix if prefix is not None else 0
        side = math.isqrt(max(n - p, 0))
        if n - p <= 0 or side * side != n - p:
            raise SERError(
                f"layer {layer}: {n} tokens with {p} prefix tokens are not a square grid and the input size is unknown; "
                "pass num_prefix_tokens= and patch_size= to attach_ser so the grid can be derived from the input."
            )
        h = w = side
    return rearrange(tokens[:, p:], "b (h w) c -> b c h w", h=h, w=w), p


def _first_image(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Tensor]:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, Tensor) and v.dim() == 4:
            return v
    return None


class InputSizeRecorder:
    """Forward pre-hook on the model root: remembers the spatial size of the input image batch."""

    def __init__(self) -> None:
        self.hw: Optional[Tuple[int, int]] = None
        self.ptr: Optional[int] = None

    def __call__(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        x = _first_image(args, kwargs)
        if x is not None:
            self.hw = (int(x.shape[-2]), int(x.shape[-1]))
            # the input's address (no reference kept): lets ser.loss spot views captured in the wrong order
            self.ptr = input_address(x)

    def __deepcopy__(self, memo: Dict[int, Any]) -> InputSizeRecorder:
        return InputSizeRecorder()


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


def is_compiled(model: nn.Module) -> bool:
    """True for ``torch.compile(model)`` wrappers and ``model.compile()``d modules."""
    return type(model).__name__ == "OptimizedModule" or getattr(model, "_compiled_call_impl", None) is not None


def iter_prefix_params(model: nn.Module) -> List[nn.Parameter]:
    """Raw prefix-token parameters ([CLS], then registers) of timm / DINO / DINOv2 ViTs, for late insertion."""
    out: List[nn.Parameter] = []
    cls = getattr(model, "cls_token", None)
    if isinstance(cls, nn.Parameter):
        out.append(cls)
    for name in ("reg_token", "register_tokens"):
        reg = getattr(model, name, None)
        if isinstance(reg, nn.Parameter):
            out.append(reg)
    return out

