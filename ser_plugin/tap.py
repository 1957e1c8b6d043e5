"""The layer tap: forward hooks that record block outputs only while armed.

One hook type, :class:`TapHook`, serves the SER capture, :func:`~ser_plugin.metrics.equivariance_score` and
late [CLS] insertion. Arming is a stack of sessions, so ``capture()`` nests, ``encode()`` / ``forward_loss()`` /
``equivariance_score()`` inside an open capture neither disarm it nor add records, and an exception inside a
capture drops that block's records. In a deep copy or a pickle of the hooked model a tap hook turns inert
(it records nothing); in a pickle (``torch.save(model)``) it becomes a standard-library no-op, so the saved model
loads without ser_plugin; late [CLS] hooks keep working in both. :func:`remove_tap_hooks` removes all of them.
"""

from __future__ import annotations

import copy
import functools
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .capture import InputInfo, block_tokens, inspect_input
from .errors import SERError
from .vit import model_roots

__all__ = ["TapHook", "LayerTap", "live_taps", "remove_tap_hooks", "is_ser_hook"]

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class EarlyExit(Exception):
    """Raised by the block hook in an early-exit session (``encode``) to skip the blocks above L."""


class TapHook:
    """The one hook type of ser_plugin: calls ``fn``; defines what copies and pickles of the hooked model get.

    Args:
        fn: the callback (None: inert). role: ``"input"``, ``"capture"`` or ``"late_cls"``.
        owner: the :class:`LayerTap` it belongs to, if any. survives_copy: copies keep a working hook
            (late [CLS], part of the architecture) instead of an inert one (recording).
    """

    def __init__(self, fn: Optional[Callable[..., Any]] = None, role: str = "capture", owner: Any = None, survives_copy: bool = False) -> None:
        self.fn, self.role, self.owner, self.survives_copy = fn, role, owner, survives_copy

    def __call__(self, *args: Any) -> Any:
        return None if self.fn is None else self.fn(*args)

    def __deepcopy__(self, memo: Dict[int, Any]) -> TapHook:
        if not self.survives_copy:
            return _InertHook(None, self.role)
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    def __reduce__(self) -> Tuple[Any, Tuple[Any, ...]]:
        if self.survives_copy:
            return (_rebuild, (type(self), self.__dict__))
        # a recording hook pickles as a no-op built only from the standard library, so a whole-model save
        # (torch.save(model)) loads where ser_plugin is not installed and runs as the stock model
        return (functools.partial, (sys.audit, _INERT_EVENT, self.role))


def _rebuild(cls: type, state: Dict[str, Any]) -> TapHook:
    obj = cls.__new__(cls)
    obj.__dict__.update(state)
    return obj


#: the audit event name of a pickled recording hook: ``functools.partial(sys.audit, _INERT_EVENT, role)`` returns
#: None (the hook changes nothing) and raises only the audit event (nothing happens unless an audit hook is installed)
_INERT_EVENT = "ser_plugin.inert_hook"


def is_ser_hook(hook: Any) -> bool:
    """True for every hook object ser_plugin puts in a model, and for what a recording hook becomes in a pickle."""
    if isinstance(hook, TapHook):
        return True
    return isinstance(hook, functools.partial) and hook.func is sys.audit and hook.args[:1] == (_INERT_EVENT,)


class _CaptureHook(TapHook):
    """A live recording hook of a :class:`LayerTap`."""


class _InertHook(TapHook):
    """What a recording hook becomes in a copy or pickle of the model: records nothing; ``remove_ser`` removes it."""


def _in_backward() -> bool:
    """True while autograd runs a backward pass: checkpoint recomputation re-runs block L there, not a new view."""
    return torch._C._current_graph_task_id() != -1


@dataclass
class _Session:
    kind: str  # "capture" (into the tap's records), "collect" (into sink), "pause" (records nothing)
    grad: bool
    start: int
    sink: Optional[List[Tensor]] = None
    early_exit: bool = False
    inputs: List[Optional[InputInfo]] = field(default_factory=list)


class LayerTap:
    """Hooks on a model's root (what the input was) and on some blocks (their outputs as token maps).

    Args:
        model: the hooked model; its forward pre-hook records the input and refuses masked inputs while armed.
        blocks: ``{layer: block}`` to hook. to_map: ``(tokens, input_info, layer) -> map``.
        fingerprints: record a small input fingerprint for the pairing check.
        owner: the object that owns the tap (for :func:`live_taps`).
    """

    def __init__(self, model: nn.Module, blocks: Dict[int, nn.Module], to_map: Callable[[Tensor, Optional[InputInfo], int], Tensor],
                 fingerprints: bool = True, owner: Any = None) -> None:
        self.records: List[Tensor] = []
        self.inputs: List[Optional[InputInfo]] = []
        #: per record, the serial number of the outermost capture block that recorded it
        self.record_blocks: List[int] = []
        self._blocks = 0
        self.to_map, self.fingerprints, self.owner = to_map, fingerprints, owner
        self._stack: List[_Session] = []
        self._input: Optional[InputInfo] = None
        self._root_input = False  # the root's pre-hook recorded the input of the pass now running
        self._last_layer = max(blocks) if blocks else None
        self._handles = [model.register_forward_pre_hook(_CaptureHook(self._on_input, "input", self), with_kwargs=True)]
        embed = _patch_embedding(model)
        if embed is not None and embed is not model:  # the input size also when an entry point skips the root forward
            self._handles.append(embed.register_forward_pre_hook(_CaptureHook(self._on_embed_input, "input", self), with_kwargs=True))
        for layer, block in blocks.items():
            self._handles.append(block.register_forward_hook(_CaptureHook(self._make_output_hook(layer), "capture", self)))

    @property
    def is_live(self) -> bool:
        return bool(self._handles)

    def _on_input(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        s = self._stack[-1] if self._stack else None
        if s is None or s.kind == "pause" or _in_backward():
            return
        self._input = inspect_input(args, kwargs, fingerprint=self.fingerprints and s.kind == "capture")
        self._root_input = self._input is not None

    def _on_embed_input(self, module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
        """The patch embedding's input: the input of the pass when the root forward was not called (timm's
        ``forward_features``, a wrapper's sub-entry point) or took something else (a list of crops)."""
        s = self._stack[-1] if self._stack else None
        if s is None or s.kind == "pause" or _in_backward():
            return
        x = next((v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor) and v.dim() == 4), None)
        if x is None:
            return
        if self._root_input and self._input is not None and self._input.hw == tuple(x.shape[-2:]):
            self._root_input = False  # the root recorded this pass's images: keep them (address and fingerprint)
            return
        self._root_input = False
        self._input = inspect_input((x,), {}, fingerprint=self.fingerprints and s.kind == "capture")

    def _make_output_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            s = self._stack[-1] if self._stack else None
            if s is None or s.kind == "pause" or _in_backward():
                return
            if s.grad and not torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
                raise SERError(
                    f"layer {layer} ran without autograd inside an armed capture, so L_equiv would send it no gradient. Either "
                    "the pass ran under torch.no_grad() (run both SER views with gradient; put teacher/target passes outside "
                    "`with ser.capture()` and give them as ser.loss(pair, keys=...)), or reentrant gradient checkpointing "
                    "(torch.utils.checkpoint with use_reentrant=True, timm < 1.0.13) hid the tokens' graph: use non-reentrant "
                    "checkpointing (use_reentrant=False, timm >= 1.0.13) or disable it."
                )
            fmap = self.to_map(block_tokens(output), self._input, layer)
            info = self._input
            if layer == self._last_layer:  # consumed: a later pass that shows no input never reuses this one
                self._input = None
            if s.sink is not None:
                s.sink.append(fmap)
            else:
                self.records.append(fmap)
                self.inputs.append(info)
                self.record_blocks.append(self._blocks)
            if s.early_exit:
                raise EarlyExit()

        return hook

    @contextmanager
    def armed(self, kind: str = "capture", sink: Optional[List[Tensor]] = None, early_exit: bool = False) -> Iterator[None]:
        """Arms the tap for the block; nests; on an exception the block's own records are dropped.

        An outermost capture block that begins while two or more records are held drops them first: they already
        formed a pair that no ``ser.loss`` consumed (a step skipped after its captures). One held record is kept
        (the first view of a two-block step looks the same as a skipped step's one concatenated pass)."""
        if not self.is_live:
            raise SERError("this layer tap was removed; attach again with attach_ser(model, layer).")
        if kind == "capture" and not any(x.kind == "capture" for x in self._stack):
            self._blocks += 1
            if len(self.records) >= 2:
                self.clear()
        s = _Session(kind, torch.is_grad_enabled(), len(self.records), sink, early_exit)
        self._stack.append(s)
        try:
            yield
        except BaseException:
            if kind == "capture":
                del self.records[s.start :], self.inputs[s.start :], self.record_blocks[s.start :]
            raise
        finally:
            self._stack.remove(s)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Records nothing in the block (another tool's forward passes on the same model)."""
        with self.armed("pause", sink=[]):
            yield

    def collect(self, model: nn.Module, run: Callable[[], Any]) -> Tuple[List[Tensor], Any]:
        """Runs ``run()`` (a forward pass of ``model``) with this tap collecting its blocks' maps in forward order
        and every other live tap on ``model`` (SER handles) paused; returns the maps and ``run``'s output."""
        sink: List[Tensor] = []
        with ExitStack() as stack:
            for other in live_taps(model):
                if other is not self:
                    stack.enter_context(other.paused())
            stack.enter_context(self.armed("collect", sink=sink))
            out = run()
        return sink, out

    def take(self) -> Tuple[List[Tensor], List[Optional[InputInfo]]]:
        """The records and their input infos; the tap is emptied."""
        out = (self.records, self.inputs)
        self.records, self.inputs, self.record_blocks = [], [], []
        return out

    def clear(self) -> None:
        self.records.clear()
        self.inputs.clear()
        self.record_blocks.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._stack = []
        self.clear()


def _patch_embedding(model: nn.Module) -> Optional[nn.Module]:
    """The module that takes the images in a ViT: timm/DINO ``patch_embed``, HF ``embeddings.patch_embeddings``,
    torchvision ``conv_proj`` (also inside ``vit``/``backbone`` wrappers), else the first Conv2d; None if none."""
    for root in model_roots(model):
        for found in (getattr(root, "patch_embed", None), getattr(getattr(root, "embeddings", None), "patch_embeddings", None),
                      getattr(root, "conv_proj", None)):
            if isinstance(found, nn.Module):
                return found
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def _tap_hooks(model: nn.Module) -> Iterator[Tuple[nn.Module, str, int, TapHook]]:
    for m in model.modules():
        for dname in _HOOK_DICTS:
            for k, h in list(getattr(m, dname).items()):
                if is_ser_hook(h):
                    yield m, dname, k, h


def live_taps(model: nn.Module) -> List[LayerTap]:
    """The live taps with a hook anywhere in ``model`` (each once)."""
    taps: Dict[int, LayerTap] = {}
    for *_, h in _tap_hooks(model):
        if isinstance(getattr(h, "owner", None), LayerTap) and h.owner.is_live:
            taps[id(h.owner)] = h.owner
    return list(taps.values())


def remove_tap_hooks(model: nn.Module) -> int:
    """Removes every ser_plugin hook left in ``model`` (inert copies, late [CLS] of copies); returns how many."""
    n = 0
    for m, dname, k, _ in list(_tap_hooks(model)):
        del getattr(m, dname)[k]
        for flag in _HOOK_FLAGS:
            getattr(m, flag, {}).pop(k, None)
        n += 1
    return n
