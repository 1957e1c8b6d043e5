"""attach_ser: one call that hooks a ViT's block L and returns the SER handle."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .capture import (
    InputSizeRecorder,
    block_tokens,
    compiling,
    declared_prefix_tokens,
    detect_patch_size,
    find_blocks,
    input_address,
    is_compiled,
    model_roots,
    resolve_layer,
    tokens_to_map,
)
from .config import NOT_CONFIG_OPTIONS, SERConfig
from .errors import SERError
from .late_cls import LateCLS, convert_late_cls
from .loss import TokenInfoNCE
from .objective import SERLoss
from .views import EquivariantViews, ViewPair

__all__ = ["SER", "attach_ser", "remove_ser"]

#: option values whose behaviour lands with another branch; refused until then (the lead lifts these guards at merge)
_NOT_YET = {
    "pairing": ("independent",),
    "image_interpolation": ("bilinear",),
    "scale_frame": ("view2",),
}


def build_config(layer: Any, config: Optional[SERConfig], preset: Optional[str], options: Dict[str, Any]) -> SERConfig:
    """The handle's SERConfig: ``preset`` (if any), then ``config`` (if any), then ``options`` and ``layer``.

    Raises:
        SERError: an unknown option (listing the valid ones), a bad value, no layer, or an option value not
            implemented in this build.
    """
    SERConfig.check_names(options, also=NOT_CONFIG_OPTIONS)
    if config is not None and not isinstance(config, SERConfig):
        raise SERError(f"config must be a SERConfig, got {type(config).__name__}; build one with SERConfig(...) or pass options as keywords.")
    if preset is not None:
        if config is not None:
            raise SERError("give either config= or preset=, not both (SERConfig.preset(name, **overrides) combines them).")
        config = SERConfig.preset(preset)
    cfg = config if config is not None else SERConfig()
    if layer is not None:
        options = {**options, "layer": layer}
    if options:
        cfg = cfg.replace(**options)
    if cfg.layer is None:
        raise SERError("no layer given: attach_ser(model, layer) or SERConfig(layer=...); layer L is the block whose output SER regularises (1..depth).")
    for name, ok in _NOT_YET.items():
        if getattr(cfg, name) not in ok:
            raise SERError(f"{name}={getattr(cfg, name)!r} is not implemented in this build (available: {', '.join(map(repr, ok))}).")
    if cfg.photometric == "authors":
        raise SERError("photometric='authors' is not implemented in this build (available: 'mocov3', None or a pair of callables).")
    return cfg


class _EarlyExit(Exception):
    """Raised by the hook after block L in :meth:`SER.encode`, to skip the blocks above L."""


class _InertHook:
    """What a capture hook becomes in a deep copy (or pickle) of the hooked model: it records nothing."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        return None


def _in_backward() -> bool:
    """True while autograd runs a backward pass: checkpoint recomputation re-runs block L there, not a new view."""
    return torch._C._current_graph_task_id() != -1


class _CaptureHook:
    """Forward hook on block L. Holds its SER handle and records only while the handle is armed.

    ``copy.deepcopy(model)`` (teachers built as copies) turns it into an :class:`_InertHook`, so the copy can
    never write into the original's captures; attach a separate SER to the copy if it needs one.
    """

    def __init__(self, owner: SER) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        owner = self.owner
        if owner._armed and module is owner._block and not _in_backward():
            owner._record(output)

    def __deepcopy__(self, memo: Dict[int, Any]) -> _InertHook:
        return _InertHook()

    def __reduce__(self) -> Tuple[Any, Tuple[()]]:
        return (_InertHook, ())


def _attached_handles(model: nn.Module) -> List[SER]:
    """The live SER handles whose capture hooks sit anywhere in ``model``."""
    owners = {id(h.owner): h.owner for m in model.modules() for h in m._forward_hooks.values() if isinstance(h, _CaptureHook)}
    return [o for o in owners.values() if o.is_attached]


def _accepts_other_sizes(model: nn.Module) -> bool:
    for root in model_roots(model):
        if getattr(root, "dynamic_img_size", False):  # timm
            return True
        if callable(getattr(root, "interpolate_pos_encoding", None)):  # DINO, DINOv2
            return True
        if callable(getattr(getattr(root, "embeddings", None), "interpolate_pos_encoding", None)):  # HF (forward needs the flag)
            return True
    return False


class SER(nn.Module):
    """Handle returned by :func:`attach_ser`.

    It is an ``nn.Module`` holding only SER's own parameters (the optional token head), so
    ``ser.parameters()`` go to the optimizer and ``ser.to(device)`` moves them; the hooked model is *not*
    registered under it (and nothing is registered under the model).

    Typical step::

        pair = ser.views(x_b2)                   # two equivariant views + their elements
        with ser.capture():                      # only these forward passes are recorded
            out1, out2 = model(pair.x1), model(pair.x2)
        loss = ssl_loss(out1, out2) + ser.loss(pair)

    or, when the host's SSL loss should not see the views, ``loss = ssl_loss + ser.forward_loss(pair)``
    (runs the encoder itself and stops after block L).
    """

    def __init__(
        self,
        model: nn.Module,
        layer: Optional[int] = None,
        *,
        config: Optional[SERConfig] = None,
        blocks: Union[None, str, Sequence[nn.Module]] = None,
        patch_size: Optional[int] = None,
        num_prefix_tokens: Optional[int] = None,
        forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
        preset: Optional[str] = None,
        **options: Any,
    ) -> None:
        super().__init__()
        cfg = build_config(layer, config, preset, options)
        scale, late_cls = cfg.scale, cfg.late_cls
        layer = cfg.layer
        if not isinstance(model, nn.Module):
            raise SERError(f"attach_ser needs an nn.Module, got {type(model).__name__}.")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module  # hook the wrapped model: its hooks fire when the wrapper is called
        if is_compiled(model):
            raise SERError(
                "the model is already compiled (torch.compile): hooks registered after compiling are silently "
                "ignored (pytorch#117758). Attach SER first, then compile: ser = attach_ser(model, L); model = torch.compile(model)."
            )
        for owner in _attached_handles(model):
            raise SERError(
                f"SER is already attached to this {type(model).__name__} (layer {owner.layer}); call .remove() on that handle first "
                "(or ser_plugin.remove_ser(model) if the handle is lost)."
            )
        blist = find_blocks(model, blocks)
        self.depth = len(blist)
        self.layer = resolve_layer(layer, self.depth) + 1
        object.__setattr__(self, "_model", model)  # not a submodule
        object.__setattr__(self, "_block", blist[self.layer - 1])
        detected = detect_patch_size(model)
        if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1):
            raise SERError(f"patch_size must be a positive int, got {patch_size!r}.")
        if isinstance(patch_size, int) and detected is not None and detected != (patch_size, patch_size):
            raise SERError(f"patch_size={patch_size} but {type(model).__name__}'s patch embedding uses {detected}; drop patch_size= (it is detected).")
        self.patch_size: Optional[Tuple[int, int]] = (patch_size, patch_size) if isinstance(patch_size, int) else detected
        declared = declared_prefix_tokens(model) if num_prefix_tokens is None else int(num_prefix_tokens)
        if scale is not None and not _accepts_other_sizes(model):
            raise SERError(
                f"scale views need a ViT that accepts other input sizes; {type(model).__name__} does not (fixed position "
                "embedding). Enable it (timm: create_model(..., dynamic_img_size=True); HF: call with "
                "interpolate_pos_encoding=True) or use D4 only: scale=None."
            )
        self._late: Optional[LateCLS] = None
        self._forward = forward
        self._armed = False
        self._early_exit = False
        self._grad_at_arm = False
        self._captures: List[Tensor] = []
        dim = self._embed_dim(model)
        if cfg.head is True and dim is None:
            raise SERError("head=True needs the token width, which could not be detected; pass head=TokenHead(dim) yourself.")
        objective = SERLoss(cfg, dim=dim)
        objective.where = f"layer {self.layer}"
        object.__setattr__(self, "objective", objective)  # not a submodule: the head is registered once, as ser.head
        self.head: Optional[nn.Module] = objective.head
        self.config = cfg
        psz = self.patch_size[0] if self.patch_size is not None else None
        self.view_policy = EquivariantViews(
            patch_size=psz or 1, rotations=cfg.rotations, flips=cfg.flips, scale=scale, ratio=cfg.ratio, photometric=cfg.photometric, mean=cfg.mean, std=cfg.std
        )
        self._recorder = InputSizeRecorder()
        self._handles = [
            model.register_forward_pre_hook(self._recorder, with_kwargs=True),
            self._block.register_forward_hook(_CaptureHook(self)),
        ]
        self._prefix = declared
        if late_cls:
            # registered after the capture hook, so the capture sees block L's patch tokens before [CLS] returns
            self._late = convert_late_cls(model, self.layer, blocks)
            self._prefix = 0

    # ------------------------------------------------------------------ properties
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    @staticmethod
    def _embed_dim(model: nn.Module) -> Optional[int]:
        for root in model_roots(model):
            for attr in ("embed_dim", "hidden_dim", "num_features"):
                v = getattr(root, attr, None)
                if isinstance(v, int):
                    return v
            v = getattr(getattr(root, "config", None), "hidden_size", None)
            if isinstance(v, int):
                return v
        return None

    # ------------------------------------------------------------------ capture
    def _record(self, output: Any) -> None:
        tokens = block_tokens(output)
        if self._grad_at_arm and not torch.is_grad_enabled() and any(p.requires_grad for p in self._block.parameters()):
            raise SERError(
                f"layer {self.layer} ran without autograd inside an armed capture, so L_equiv would send it no gradient. Either "
                "the pass ran under torch.no_grad() (run both SER views with gradient; put teacher/target passes outside "
                "`with ser.capture()` and give them as ser.loss(pair, keys=...)), or reentrant gradient checkpointing "
                "(torch.utils.checkpoint with use_reentrant=True, timm < 1.0.13) hid the tokens' graph: use non-reentrant "
                "checkpointing (use_reentrant=False, timm >= 1.0.13) or disable it."
            )
        fmap, _ = tokens_to_map(tokens, self._recorder.hw, self.patch_size, self._prefix, self.layer)
        if self._recorder.ptr is not None and not compiling():
            fmap._ser_input_ptr = self._recorder.ptr  # type: ignore[attr-defined]  # checked in _pair_maps
        self._captures.append(fmap)
        if self._early_exit:
            raise _EarlyExit()

    @contextmanager
    def capture(self) -> Iterator[SER]:
        """Arms the hook: every forward pass of the model inside the block records layer L's token map."""
        self._check_attached()
        self._armed, self._grad_at_arm = True, torch.is_grad_enabled()
        try:
            yield self
        finally:
            self._armed = False

    def clear(self) -> None:
        """Drops recorded token maps (e.g. after an exception between capture and loss)."""
        self._captures = []

    @property
    def captures(self) -> List[Tensor]:
        return list(self._captures)

    def encode(self, x: Tensor) -> Tensor:
        """Layer L's token map ``(B, C, h, w)`` of ``x``; the forward stops right after block L."""
        self._check_attached()
        before = len(self._captures)
        self._armed, self._early_exit, self._grad_at_arm = True, True, torch.is_grad_enabled()
        try:
            if self._forward is not None:
                self._forward(self._model, x)
            else:
                self._model(x)
        except _EarlyExit:
            pass
        finally:
            self._armed, self._early_exit = False, False
        if len(self._captures) != before + 1:
            raise SERError(
                f"the forward pass recorded {len(self._captures) - before} maps at layer {self.layer} (expected 1); "
                "if the model was compiled after attaching, hooks may be bypassed; if the forward needs extra "
                "arguments, pass forward=lambda model, x: ... to attach_ser."
            )
        return self._captures.pop()

    # ------------------------------------------------------------------ views and loss
    def views(self, x: Tensor, generator: Optional[torch.Generator] = None) -> ViewPair:
        """Two equivariant views of ``x`` (images in [0, 1], n ≥ 2) and their elements; see :class:`EquivariantViews`."""
        self.view_policy.to(x.device)
        return self.view_policy(x, generator=generator)

    def _pair_maps(self, pair: Optional[ViewPair]) -> Tuple[Tensor, Tensor]:
        """Consumes the captures as (view 1, view 2) maps and checks them against ``pair``."""
        caps, self._captures = self._captures, []
        shapes = [tuple(c.shape) for c in caps]
        n = len(pair.g1) if pair is not None else None
        if len(caps) == 2:
            f1, f2 = caps
        elif len(caps) == 1 and caps[0].shape[0] % 2 == 0 and (n is None or caps[0].shape[0] == 2 * n):
            f1, f2 = caps[0].chunk(2)
        else:
            raise SERError(
                f"ser.loss() needs layer {self.layer}'s maps of the two views: 2 captures (view 1 then view 2) or one "
                f"capture of both concatenated; got {len(caps)} capture(s) with shapes {shapes}"
                + (" — run the views' forward passes inside `with ser.capture():`" if not caps else "")
                + "."
            )
        if pair is not None:
            self._check_pair(pair, f1, f2)
        return f1, f2

    def _check_pair(self, pair: ViewPair, f1: Tensor, f2: Tensor) -> None:
        n = len(pair.g1)
        if len(pair.g1) != len(pair.g2) or pair.x1.shape[0] != len(pair.g1) or pair.x2.shape[0] != len(pair.g2):
            raise SERError(
                f"views and elements disagree: x1 {tuple(pair.x1.shape)}, x2 {tuple(pair.x2.shape)}, {len(pair.g1)} and {len(pair.g2)} elements."
            )
        a1, a2 = input_address(pair.x1), input_address(pair.x2)
        if a1 is not None and a1 != a2 and (getattr(f1, "_ser_input_ptr", None), getattr(f2, "_ser_input_ptr", None)) == (a2, a1):
            raise SERError(
                f"the captures ran on view 2 then view 1 (layer {self.layer}); ser.loss() takes them in order view 1, view 2: "
                "run model(pair.x1) before model(pair.x2) inside ser.capture(), or one pass on torch.cat([pair.x1, pair.x2])."
            )
        if f1.shape[0] != n or f2.shape[0] != n:
            raise SERError(f"captured maps {tuple(f1.shape)}, {tuple(f2.shape)} do not match the {n} images of the views; capture exactly the two views' passes.")
        if self.patch_size is not None:
            for i, (x, f) in enumerate(((pair.x1, f1), (pair.x2, f2)), 1):
                grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
                if tuple(f.shape[-2:]) != grid:
                    raise SERError(f"view {i} is {tuple(x.shape)} (grid {grid}) but its captured map is {tuple(f.shape)}: captures out of order or not these views.")

    def loss(
        self, pair: Optional[ViewPair] = None, *, g: Optional[Any] = None, keys: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tensor:
        """``λ·L_equiv`` from the two captured view maps; consumes the captures.

        Args:
            pair: the :class:`ViewPair` the captured passes ran on (its relative element aligns the maps).
            g: the relative elements ``g2 ∘ g1⁻¹`` instead of ``pair``.
            keys: optional teacher/momentum maps ``(k1, k2)`` of the same views as no-grad keys.
        """
        self._check_attached()
        if pair is None and g is None:
            self._captures = []
            raise SERError("ser.loss() needs the ViewPair (or g=relative elements) of the captured views.")
        f1, f2 = self._pair_maps(pair)
        rel = pair.relative if pair is not None else g
        return self._weighted(f1, f2, rel, keys)

    def forward_loss(self, pair: ViewPair, keys: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """Runs the encoder on both views (stopping after block L) and returns ``λ·L_equiv``."""
        return self.loss_from_maps(pair, self.encode(pair.x1), self.encode(pair.x2), keys=keys)

    def loss_from_maps(self, pair: ViewPair, f1: Tensor, f2: Tensor, keys: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``λ·L_equiv`` from layer-L maps of the pair's two views obtained by the caller (e.g. sliced out of a
        larger capture); same checks and bookkeeping as :meth:`loss`, captures untouched."""
        self._check_attached()
        self._check_pair(pair, f1, f2)
        return self._weighted(f1, f2, pair.relative, keys)

    def _weighted(self, f1: Tensor, f2: Tensor, g: Any, keys: Optional[Tuple[Tensor, Tensor]]) -> Tensor:
        return self.objective(f1, f2, g, keys=keys)

    # ------------------------------------------------------------------ settable options
    @property
    def criterion(self) -> TokenInfoNCE:
        return self.objective.criterion

    @property
    def last_loss(self) -> Optional[Tensor]:
        return self.objective.last_loss

    @property
    def lam(self) -> float:
        return self.objective.lam

    @lam.setter
    def lam(self, value: Any) -> None:
        self.objective.lam = value
        self.config = self.objective.config

    @property
    def tau(self) -> float:
        return self.objective.tau

    @tau.setter
    def tau(self, value: Any) -> None:
        self.objective.tau = value
        self.config = self.objective.config

    # ------------------------------------------------------------------ lifecycle
    def _check_attached(self) -> None:
        if not self.is_attached:
            raise SERError("this SER handle was removed; attach again with attach_ser(model, layer).")

    def remove(self) -> None:
        """Removes every hook (and the late-[CLS] conversion): the model is exactly as before attach_ser."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._late is not None:
            self._late.remove()
            self._late = None
        self._captures = []

    def __enter__(self) -> SER:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __deepcopy__(self, memo: Dict[int, Any]) -> SER:
        raise SERError("an SER handle cannot be deep-copied (it is bound to one model's hooks); attach a new one to the copy.")

    def extra_repr(self) -> str:
        return f"layer={self.layer}/{self.depth}, lam={self.lam}, patch_size={self.patch_size}, prefix_tokens={self._prefix}, late_cls={self._late is not None}, attached={self.is_attached}"


def attach_ser(model: nn.Module, layer: Optional[int] = None, *, config: Optional[SERConfig] = None, **options: Any) -> SER:
    """Attaches Soft Equivariance Regularization to block ``layer`` of a ViT.

    Args:
        model: a timm, torchvision, HF transformers, DINO/DINOv2-style or lightly ViT (or any model with
            ``blocks=`` given).
        layer: ``L`` — the token map after the first ``L`` blocks (``1..depth``; negative counts from the end);
            or ``config.layer``.
        config: a :class:`SERConfig`; ``options`` override its fields.
        **options: :class:`SERConfig` fields (``lam``, ``tau``, ``head``, ``late_cls``, ``scale``, ``photometric``,
            ``mean``/``std``, ...), ``preset="authors"``, and the model-description overrides ``blocks``
            (dotted path or list of blocks), ``patch_size``, ``num_prefix_tokens``, ``forward``
            (``lambda model, x: ...``).

    Returns:
        The :class:`SER` handle: ``views``, ``capture``, ``loss``, ``forward_loss``, ``encode``, ``remove``.

    Raises:
        SERError: an unknown option (the valid names are listed), a bad value, a model SER cannot hook
            correctly, or an impossible combination.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4)
        >>> ser = attach_ser(vit, layer=2, photometric=None)
        >>> pair = ser.views(torch.rand(4, 3, 32, 32))
        >>> with ser.capture():
        ...     _ = vit(pair.x1), vit(pair.x2)
        >>> ser.loss(pair).backward()
        >>> ser.remove()
    """
    return SER(model, layer, config=config, **options)


def remove_ser(model: nn.Module) -> int:
    """Removes every SER attached to ``model`` (for when the handle was lost); returns how many."""
    owners = _attached_handles(model)
    for owner in owners:
        owner.remove()
    return len(owners)
