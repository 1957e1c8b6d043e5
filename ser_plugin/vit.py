"""What SER needs to know about a ViT, resolved once at attach: :class:`ViTDescription` and :func:`describe_vit`.

The blocks (auto-detected or ``blocks=``), the patch size, the prefix-token count ([CLS] + registers, or 0
for pooled models), the token width, the input channels and whether other input sizes are accepted.
Every value can be overridden at attach; what cannot be hooked correctly is refused here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple, Union

from torch import nn

from .errors import SERError

__all__ = [
    "ViTDescription",
    "describe_vit",
    "model_roots",
    "find_blocks",
    "resolve_layer",
    "detect_patch_size",
    "declared_prefix_tokens",
    "is_compiled",
    "iter_prefix_params",
]

_BLOCK_LIST_NAMES = ("blocks", "layers", "layer")
_CONTAINERS = (nn.ModuleList, nn.Sequential)
BlocksArg = Union[None, str, Sequence[nn.Module]]


def model_roots(model: nn.Module) -> List[nn.Module]:
    """The model and the wrapped ViT inside common wrappers (lightly ``vit``, ``backbone``, MoCo ``base_encoder``)."""
    roots = [model] + [getattr(model, name, None) for name in ("vit", "backbone", "base_encoder")]
    return [r for r in roots if isinstance(r, nn.Module)]


def _flatten_chunks(blocks: Sequence[nn.Module]) -> List[nn.Module]:
    """DINOv2 chunked layout: ``blocks[c]`` is a BlockChunk (a ModuleList padded with Identity)."""
    out: List[nn.Module] = []
    for b in blocks:
        if isinstance(b, nn.ModuleList):
            out.extend(m for m in b if not isinstance(m, nn.Identity))
        else:
            out.append(b)
    return out


def _is_sublayer_list(m: nn.Module) -> bool:
    """A plain ModuleList entry of a block list (never called itself) whose members differ in structure: sub-layers
    (attention, feed-forward) that the parent's loop calls one by one, adding the residuals itself. A chunk of
    identical blocks (DINOv2's chunked layout, padded with Identity) is not one."""
    if not isinstance(m, nn.ModuleList) or type(m).forward is not nn.Module.forward:
        return False
    return len({tuple(type(x) for x in c.modules()) for c in m if not isinstance(c, nn.Identity)}) > 1


def _entry_kind(m: nn.Module) -> str:
    if isinstance(m, _CONTAINERS):
        return f"{type(m).__name__}[{', '.join(dict.fromkeys(type(c).__name__ for c in m))}]"
    return type(m).__name__


def _sublayer_pairs_message(model: nn.Module, path: str, entries: Sequence[nn.Module]) -> str:
    """Why a list of [attention, feed-forward] ModuleLists cannot be hooked, and what to pass instead."""
    first = next(m for m in entries if _is_sublayer_list(m))
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    owner = type(model.get_submodule(parent)).__name__ if parent or path else type(model).__name__
    return (
        f"{path!r} holds {len(entries)} entries of {_entry_kind(first)}: plain ModuleLists of sub-layers that "
        f"{owner}.forward calls one by one, adding the residuals itself. No module there outputs the residual stream "
        "after a block, so hooking one would capture an attention or feed-forward output (a wrong map). Wrap each "
        "pair in a thin module that returns the stream — forward(x): x = attn(x) + x; return ff(x) + x — keep those "
        f"in an nn.ModuleList that {owner}.forward calls as x = block(x), and pass blocks={path!r}; or compute "
        "layer L's map yourself and use ser_plugin.SERLoss(f1, f2, pair) with ser_plugin.EquivariantViews."
    )


def _list_path(model: nn.Module, entries: Sequence[nn.Module], given: Any) -> str:
    if isinstance(given, str):
        return given
    names = {id(m): name for name, m in model.named_modules()}
    name = names.get(id(entries[0]), "")
    return name.rsplit(".", 1)[0] if "." in name else name or "<list>"


def _candidate_lists(model: nn.Module, limit: int = 6) -> str:
    """The model's ModuleList/Sequential modules of 2+ entries, shallowest first: what blocks= could point at."""
    found: List[Tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():  # parents come first: skip lists nested in a listed one
        if name and isinstance(mod, _CONTAINERS) and len(mod) > 1 and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, mod))
    found.sort(key=lambda c: c[0].count("."))
    out = []
    for name, mod in found[:limit]:
        kinds = list(dict.fromkeys(_entry_kind(m) for m in mod))
        out.append(f"{name!r} ({len(mod)} entries" + (f" of {kinds[0]})" if len(kinds) == 1 else f": {', '.join(kinds)})"))
    return ", ".join(out) + (f" and {len(found) - limit} more" if len(found) > limit else "") if out else "none"


def _has_patch_embedding(m: nn.Module) -> bool:
    return any(isinstance(c, nn.Conv2d) for c in m.modules())


def _check_whole_blocks(model: nn.Module, blocks: List[nn.Module], given: Any) -> None:
    """Refuses ``blocks=`` entries that sit inside a transformer block (attention/MLP halves, branch modules):
    their output is not the residual stream. A single-child wrapper (checkpointing) around a block is fine."""
    names = {id(m): name for name, m in model.named_modules()}
    for i, b in enumerate(blocks):
        name = names.get(id(b))
        if name is None:
            raise SERError(f"blocks= entry {i} ({type(b).__name__}) is not a sub-module of the {type(model).__name__} SER is attached to.")
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            anc_name, parent_name = ".".join(parts[:k]), ".".join(parts[: k - 1])
            anc, parent = model.get_submodule(anc_name), model.get_submodule(parent_name)
            if isinstance(anc, _CONTAINERS) or len(list(anc.children())) < 2 or _has_patch_embedding(anc):
                continue
            if isinstance(parent, _CONTAINERS):
                raise SERError(
                    f"blocks={given if isinstance(given, str) else '[...]'!r}: the entries are sub-modules of {anc_name!r} (a "
                    f"{type(anc).__name__}), not transformer blocks: an attention/MLP half or a branch does not output the "
                    f"residual stream. Pass the block list itself: blocks={parent_name!r}."
                )


def find_blocks(model: nn.Module, blocks: BlocksArg = None) -> List[nn.Module]:
    """The model's transformer blocks in order (see :func:`describe_vit`)."""
    return _find_blocks(model, blocks)[0]


def _find_blocks(model: nn.Module, blocks: BlocksArg) -> Tuple[List[nn.Module], Optional[str]]:
    if blocks is not None:
        if not isinstance(blocks, (str, nn.Module, list, tuple)):
            raise SERError(f"blocks must be a dotted path like 'blocks' or a list of block modules, got {blocks!r}.")
        path = blocks if isinstance(blocks, str) else None
        if isinstance(blocks, str):
            try:
                found: Any = model.get_submodule(blocks)
            except AttributeError as e:
                raise SERError(f"blocks={blocks!r}: {e}; pass the dotted path of the model's block list (e.g. 'blocks' or 'encoder.layer').") from None
        else:
            found = blocks
        if isinstance(found, nn.Module) and not isinstance(found, _CONTAINERS):
            raise SERError(f"blocks={blocks!r} resolves to a {type(found).__name__}, not a list of blocks (ModuleList/Sequential).")
        if any(isinstance(b, nn.Module) and _is_sublayer_list(b) for b in found):
            raise SERError(f"blocks={blocks if isinstance(blocks, str) else '[...]'!r}: " + _sublayer_pairs_message(model, _list_path(model, list(found), blocks), list(found)))
        lst = _flatten_chunks(list(found))
        if not lst or not all(isinstance(b, nn.Module) for b in lst):
            raise SERError(f"blocks={blocks!r} holds no modules.")
        _check_whole_blocks(model, lst, blocks)
        return lst, path
    candidates, pairs = [], []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _BLOCK_LIST_NAMES and isinstance(mod, _CONTAINERS) and len(mod) > 0:
            if any(_is_sublayer_list(b) for b in mod):
                pairs.append((name, mod))
                continue
            flat = _flatten_chunks(list(mod))
            if flat and len({type(b) for b in flat}) == 1:
                candidates.append((name.count("."), name, flat))
    if not candidates:
        raise SERError(
            f"no transformer blocks found in {type(model).__name__}: looked for a ModuleList/Sequential named "
            f"{'/'.join(_BLOCK_LIST_NAMES)} with blocks of one class; its lists are {_candidate_lists(model)}. "
            + (_sublayer_pairs_message(model, pairs[0][0], list(pairs[0][1])) if pairs else
               "Pass the block list explicitly: attach_ser(model, layer, blocks='path.to.blocks') or blocks=list_of_modules.")
        )
    candidates.sort(key=lambda c: c[0])
    best = [c for c in candidates if c[0] == candidates[0][0]]
    if len(best) > 1:
        raise SERError(f"several block lists found in {type(model).__name__} ({', '.join(repr(c[1]) for c in best)}); choose one with blocks='...'.")
    return best[0][2], best[0][1]


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
    if isinstance(p, int) and not isinstance(p, bool):
        return (p, p)
    if isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(v, int) for v in p):
        return (int(p[0]), int(p[1]))
    return None


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
    """Prefix tokens ([CLS] + registers) the model declares, if it does (0 for pooled models without [CLS])."""
    for root in model_roots(model):
        if isinstance(getattr(root, "num_prefix_tokens", None), int):  # timm (class_token/reg_tokens), lightly
            return root.num_prefix_tokens
        if hasattr(root, "num_register_tokens") and hasattr(root, "cls_token"):  # DINOv2
            return 1 + int(root.num_register_tokens)
        if isinstance(getattr(root, "class_token", None), nn.Parameter):  # torchvision
            return 1
        emb = getattr(root, "embeddings", None)
        if hasattr(emb, "cls_token"):  # HF; Dinov2WithRegisters declares its registers in the config
            return 1 + int(getattr(getattr(root, "config", None), "num_register_tokens", 0) or 0)
        if isinstance(getattr(root, "cls_token", None), nn.Parameter):  # DINO-style
            return 1
    return None


def _width(model: nn.Module) -> Optional[int]:
    for root in model_roots(model):
        for attr in ("embed_dim", "hidden_dim", "num_features"):
            v = getattr(root, attr, None)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        v = getattr(getattr(root, "config", None), "hidden_size", None)
        if isinstance(v, int):
            return v
    return None


def _in_chans(model: nn.Module) -> Optional[int]:
    for root in model_roots(model):
        v = getattr(getattr(root, "config", None), "num_channels", None)
        if isinstance(v, int):
            return v
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def _accepts_other_sizes(model: nn.Module) -> bool:
    for root in model_roots(model):
        if getattr(root, "dynamic_img_size", False):  # timm
            return True
        if callable(getattr(root, "interpolate_pos_encoding", None)):  # DINO, DINOv2
            return True
        if callable(getattr(getattr(root, "embeddings", None), "interpolate_pos_encoding", None)):  # HF (forward needs the flag)
            return True
    return False


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


def _refuse_wrappers(model: nn.Module) -> None:
    if isinstance(model, nn.DataParallel):
        raise SERError(
            "nn.DataParallel is not supported: its replicas run copies of the model, so block L's hook records on other "
            "devices' copies. Use DistributedDataParallel (one process per GPU): attach to the plain model, "
            "ser = attach_ser(vit, L), then wrap it, model = DistributedDataParallel(vit), and launch with torchrun."
        )
    compiled = [name or "<root>" for name, m in model.named_modules() if is_compiled(m)]
    if compiled:
        raise SERError(
            f"compiled module(s) {', '.join(compiled)} in {type(model).__name__}: hooks registered after compiling are silently "
            "ignored (pytorch#117758). Attach SER first, then compile: ser = attach_ser(model, L); model = torch.compile(model)."
        )


@dataclass(frozen=True)
class ViTDescription:
    """The resolved ViT, computed once at attach (shown in ``repr(ser)``).

    Attributes:
        blocks: the transformer blocks in order. blocks_path: their dotted path, when given or found by name.
        patch_size: ``(ph, pw)`` or None if unknown. num_prefix_tokens: [CLS] + registers (0: pooled, no [CLS]), or None.
        width: token width ``C`` or None. in_chans: image channels or None.
        accepts_other_sizes: the model takes inputs of other sizes (needed by scale views).
        layer: the hooked layer ``L`` resolved once against the depth (``1..depth``; a negative layer counted from the
            end is stored as its positive number), or None when no layer was given.
    """

    blocks: Tuple[nn.Module, ...]
    blocks_path: Optional[str]
    patch_size: Optional[Tuple[int, int]]
    num_prefix_tokens: Optional[int]
    width: Optional[int]
    in_chans: Optional[int]
    accepts_other_sizes: bool
    layer: Optional[int] = None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def border(self, layer: int) -> int:
        """Cells layer ``layer``'s map has beyond ``side / patch``: none for a ViT's token grid (see
        :class:`~ser_plugin.backbones.MapDescription` for CNN stems that pad more)."""
        return 0

    def __repr__(self) -> str:
        where = repr(self.blocks_path) if self.blocks_path is not None else f"[{len(self.blocks)} modules]"
        return (f"blocks={where}, depth={self.depth}, patch_size={self.patch_size}, prefix_tokens={self.num_prefix_tokens}, "
                f"width={self.width}, in_chans={self.in_chans}, other_sizes={self.accepts_other_sizes}")


def describe_vit(
    model: nn.Module, blocks: BlocksArg = None, patch_size: Optional[int] = None, num_prefix_tokens: Optional[int] = None, layer: Optional[int] = None
) -> ViTDescription:
    """Resolves what SER needs to know about ``model``.

    Recognises timm / DINO / DINOv2 (``blocks``, chunked included), torchvision (``encoder.layers``), HF
    transformers (``encoder.layer`` or ``layers``; register tokens from ``config.num_register_tokens``) and
    wrappers around them (lightly ``vit.blocks``, ``backbone.blocks``, ...).

    Args:
        model: the ViT (not wrapped in DataParallel; DDP is unwrapped by the caller).
        blocks: a dotted path (through ``nn.Module.get_submodule``) or the list of block modules.
        patch_size: overrides detection (must agree with a detected patch embedding).
        num_prefix_tokens: overrides the declared [CLS] + register count.
        layer: the layer to resolve against the depth (see :func:`resolve_layer`), stored as ``layer``.

    Returns:
        The :class:`ViTDescription`.

    Raises:
        SERError: DataParallel, a compiled sub-module, blocks that are not whole blocks or not found, a bad override,
            a layer out of range.
    """
    _refuse_wrappers(model)
    blist, path = _find_blocks(model, blocks)
    detected = detect_patch_size(model)
    if patch_size is not None:
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise SERError(f"patch_size must be a positive int, got {patch_size!r}.")
        if detected is not None and detected != (patch_size, patch_size):
            raise SERError(f"patch_size={patch_size} but {type(model).__name__}'s patch embedding uses {detected}; drop patch_size= (it is detected).")
        detected = (patch_size, patch_size)
    if num_prefix_tokens is not None and (isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0):
        raise SERError(f"num_prefix_tokens must be an int >= 0 ([CLS] + register tokens), got {num_prefix_tokens!r}.")
    prefix = declared_prefix_tokens(model) if num_prefix_tokens is None else num_prefix_tokens
    resolved = None if layer is None else resolve_layer(layer, len(blist)) + 1
    return ViTDescription(tuple(blist), path, detected, prefix, _width(model), _in_chans(model), _accepts_other_sizes(model), resolved)

