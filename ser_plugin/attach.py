"""attach_ser: one call that hooks a ViT's block L and returns the SER handle.

The handle is a thin composition of visible parts: the resolved :class:`~ser_plugin.vit.ViTDescription`,
a :class:`~ser_plugin.tap.LayerTap` (hooks, arming, early exit), the stateless
:class:`~ser_plugin.objective.SERLoss`, the :class:`~ser_plugin.views.EquivariantViews` policy and, with
``late_cls=True``, a :class:`~ser_plugin.late_cls.LateCLS` conversion; all options in one :class:`SERConfig`.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .backbones import block_map, describe_backbone, layer_meaning, refuse_for_maps
from .capture import InputInfo, check_pair, pairing_checks, split_captures
from .config import SERConfig, resolve_config
from .errors import SERError
from .late_cls import LateCLS, check_late_cls_layer, convert_late_cls
from .objective import SERLoss, refuse_fixed_option
from .tap import EarlyExit, LayerTap, live_taps, remove_tap_hooks
from .views import EquivariantViews, ViewPair
from .vit import ViTDescription

__all__ = ["SER", "attach_ser", "remove_ser"]


def _refuse_impossible(cfg: SERConfig, vit: ViTDescription, forward: Any, model: nn.Module) -> None:
    """Option combinations that cannot train, refused before any hook is registered."""
    name = type(model).__name__
    if cfg.late_cls:
        check_late_cls_layer(vit.layer, vit.depth)
    if cfg.mean is not None and vit.in_chans is not None and len(cfg.mean) != vit.in_chans:
        raise SERError(f"mean/std have {len(cfg.mean)} channels but {name} takes {vit.in_chans}-channel images; give one value per channel.")
    if not cfg.rotations and not cfg.flips and cfg.scale is None and cfg.photometric is None:
        raise SERError("rotations=False, flips=False, scale=None and photometric=None make the two views identical: L_equiv has nothing to align. Enable rotations/flips (or scale, or photometrics).")
    if forward is not None and not callable(forward):
        raise SERError(f"forward must be a callable (model, x) -> Any, e.g. lambda m, x: m(pixel_values=x); got {forward!r}.")
    if cfg.scale is not None and not vit.accepts_other_sizes:
        raise SERError(
            f"scale views need a ViT that accepts other input sizes; {name} does not (fixed position embedding). Enable it "
            "(timm: create_model(..., dynamic_img_size=True); HF: call with interpolate_pos_encoding=True) or use D4 only: scale=None."
        )
    border = vit.border(vit.layer)
    if cfg.scale is not None and border:
        raise SERError(
            f"scale views need a map of exactly side/stride cells, and layer {vit.layer} of {name} has {border:+d} border cells (its stem "
            "pads more than its kernel needs, e.g. solo-learn's CIFAR conv1 with padding=2), so a rescaled view's map is not the rescaled "
            "map. Use D4 views (scale=None), or a stem with padding = kernel // 2."
        )
    if cfg.head is True and vit.width is None:
        raise SERError("head=True needs the token width, which could not be detected; pass head=TokenHead(dim) yourself.")


def _target_model(model: Any) -> nn.Module:
    """The module to hook: DDP unwrapped (its hooks fire when the wrapper is called); not one SER already hooks."""
    if not isinstance(model, nn.Module):
        raise SERError(f"attach_ser needs an nn.Module, got {type(model).__name__}.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    for tap in live_taps(model):
        raise SERError(f"SER is already attached to this {type(model).__name__} (layer {tap.owner.layer}); call .remove() on that handle "
                       "first (or ser_plugin.remove_ser(model) if the handle is lost).")
    return model


def _objective_option(name: str) -> property:
    def get(self: SER) -> float:
        return getattr(self.objective, name)

    def set(self: SER, value: Any) -> None:
        setattr(self.objective, name, value)  # validated by SERConfig; effective at the next loss
        self.__dict__["config"] = self.objective.config

    return property(get, set, doc=f"{name}: settable (validated, effective at the next loss).")


class SER(nn.Module):
    """Handle returned by :func:`attach_ser`: the hooked layer, the views, the loss.

    An ``nn.Module`` holding only SER's own parameters (the optional token head, ``ser.head``) and the view
    policy; the hooked model is not registered under it. Copies and pickles of the handle are detached
    (``is_attached`` False; every call says to attach again). Only ``lam`` and ``tau`` can change after attach.

    Typical step::

        pair = ser.views(x_b2)                   # two equivariant views + their elements
        with ser.capture():                      # only these forward passes are recorded
            out1, out2 = model(pair.x1), model(pair.x2)
        loss = ssl_loss(out1, out2) + ser.loss(pair)
    """

    def __init__(self, model: nn.Module, layer: Optional[int] = None, *, config: Optional[SERConfig] = None,
                 blocks: Union[None, str, Sequence[nn.Module]] = None, patch_size: Optional[int] = None,
                 num_prefix_tokens: Optional[int] = None, forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
                 preset: Optional[str] = None, **options: Any) -> None:
        super().__init__()
        cfg = resolve_config(config, preset, options, layer=layer, require_layer=True)
        model = _target_model(model)
        vit = describe_backbone(model, blocks, patch_size, num_prefix_tokens, forward, layer=cfg.layer)  # a ViT, or a CNN / Swin (ser_plugin.backbones)
        refuse_for_maps(cfg, vit, model)
        _refuse_impossible(cfg, vit, forward, model)
        self.config, self.vit, self._layer, self._forward = cfg, vit, vit.layer, forward
        index = vit.layer - 1
        self.__dict__["_model"] = model  # not a submodule: ser.parameters() are SER's own
        objective = SERLoss(cfg, dim=vit.width)
        objective.where = f"layer {self._layer}"
        self.__dict__["objective"] = objective  # not a submodule: the head is registered once, as ser.head
        self.head: Optional[nn.Module] = objective.head
        psz = vit.patch_size[0] if vit.patch_size is not None else 1
        self.view_policy = EquivariantViews.from_config(cfg, psz)
        self._late: Optional[LateCLS] = None
        self._tap: Optional[LayerTap] = LayerTap(model, {self._layer: vit.blocks[index]}, self._to_map, owner=self)
        if cfg.late_cls:  # registered after the tap, so the capture sees block L's patch tokens before [CLS] returns
            try:
                self._late = convert_late_cls(model, self._layer, list(vit.blocks))
            except SERError:
                self._tap.remove()
                raise
        self._ready = True

    # ------------------------------------------------------------------ description
    model = property(lambda self: self._model, doc="The hooked model (None in a detached copy).")
    layer = property(lambda self: self._layer, doc="L, the hooked block (1..depth).")
    depth = property(lambda self: self.vit.depth, doc="Number of blocks.")
    patch_size = property(lambda self: self.vit.patch_size, doc="(ph, pw) or None.")
    _prefix = property(lambda self: 0 if self.config.late_cls else self.vit.num_prefix_tokens)
    _block = property(lambda self: self.vit.blocks[self._layer - 1])
    _captures = property(lambda self: self._live().records)
    is_attached = property(lambda self: self._tap is not None and self._tap.is_live, doc="True while the hooks are live.")
    criterion = property(lambda self: self.objective.criterion, doc="The TokenInfoNCE inside the objective.")
    last_loss = property(lambda self: self.objective.last_loss, doc="Last unweighted L_equiv (detached).")

    def _to_map(self, tokens: Tensor, info: Optional[InputInfo], layer: int) -> Tensor:
        return block_map(tokens, info.hw if info is not None else None, self.vit, self._prefix, layer)

    def _live(self) -> LayerTap:
        if not self.is_attached:
            raise SERError("this SER handle is not attached: it was removed, or it is a copy or came out of a pickle (copies never "
                           "record): attach again with attach_ser(model, layer).")
        return self._tap  # type: ignore[return-value]

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture(self) -> Iterator[SER]:
        """Arms the hook: every forward pass of the model inside the block records layer L's map. Nests; an exception
        inside drops the block's records; ``encode``/``forward_loss``/``equivariance_score`` inside add none."""
        with self._live().armed("capture"):
            yield self

    captures = property(lambda self: list(self._tap.records) if self.is_attached else [], doc="The recorded (B, C, h, w) maps, in order (a copy).")

    def clear(self) -> None:
        """Drops recorded maps (e.g. after slicing them out of ``captures``)."""
        if self._tap is not None:
            self._tap.clear()

    def encode(self, x: Tensor) -> Tensor:
        """Layer L's token map ``(B, C, h, w)`` of ``x``; the forward stops right after block L."""
        out: List[Tensor] = []
        with self._live().armed("collect", sink=out, early_exit=True):
            try:
                self._forward(self._model, x) if self._forward is not None else self._model(x)
            except EarlyExit:
                pass
        if len(out) != 1:
            raise SERError(f"the forward pass recorded {len(out)} maps at layer {self.layer} (expected 1); if the model was compiled after "
                           "attaching, hooks may be bypassed; if the forward needs extra arguments, pass forward=lambda model, x: ... to attach_ser.")
        return out[0]

    # ------------------------------------------------------------------ views and loss
    def views(self, x: Tensor, generator: Optional[torch.Generator] = None) -> ViewPair:
        """Two equivariant views of ``x`` and their elements; see :class:`EquivariantViews`."""
        self.view_policy.to(x.device)
        return self.view_policy(x, generator=generator)

    def loss(self, pair: Optional[ViewPair] = None, *, g: Optional[Any] = None, keys: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``λ·L_equiv`` from the two captured view maps (consumed). Checks that they ran on ``pair.x1``/``pair.x2``.

        A pair of no images (a rank without b2 images this step) gives an exact zero that still joins the other
        ranks' collectives, from its captured empty maps or, when its passes were skipped, from none.

        Args:
            pair: the :class:`ViewPair` the captured passes ran on. g: its relative elements instead (no pairing check).
            keys: optional teacher maps ``(k1, k2)`` of the same views as no-grad keys.
        """
        blocks = len(set(self._live().record_blocks))
        records, inputs = self._live().take()
        if pair is None and g is None:
            raise SERError("ser.loss() needs the ViewPair (or g=relative elements) of the captured views.")
        if not records and isinstance(pair, ViewPair) and len(pair.g1) == 0:
            # no b2 images on this rank and the passes skipped (some models cannot run an empty batch): the same
            # exact zero as from captured empty maps, joining the other ranks' collectives
            return self.objective(*(self._empty_map(x) for x in (pair.x1, pair.x2)), pair, keys=keys)
        try:
            f1, f2, views = split_captures(records, inputs, pair, self.layer)
            if pair is not None:
                check_pair(pair, f1, f2, self.patch_size, self.layer, self.vit.border(self.layer))
        except SERError as e:
            if blocks < 2:
                raise
            raise SERError(
                f"{e} The captures come from {blocks} capture blocks: a map an earlier step recorded and never passed to "
                "ser.loss (a batch skipped after its capture) is held until a loss consumes it, and a new capture block "
                "drops held maps only when they are two or more. Call ser.clear() when you skip a step after capturing."
            ) from None
        if pair is not None and self.config.check_finite:
            self.objective.pending_checks = pairing_checks(pair, views, self.layer)
        return self.objective(f1, f2, pair if pair is not None else g, keys=keys)

    def _empty_map(self, x: Tensor) -> Tensor:
        """The ``(0, C, h, w)`` layer-L map of an empty view batch ``x``; it requires grad, so the loss has a backward
        (under DDP it takes part in the other ranks' reduce-scatter, whatever the head)."""
        ph, pw = self.patch_size if self.patch_size is not None else (x.shape[-2], x.shape[-1])
        dtype = x.dtype if x.is_floating_point() else torch.float32
        shape = (0, self.vit.width or 1, max(1, x.shape[-2] // ph), max(1, x.shape[-1] // pw))
        return x.new_zeros(shape, dtype=dtype).requires_grad_(True)

    def forward_loss(self, pair: ViewPair, keys: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """Runs the encoder on both views (stopping after block L) and returns ``λ·L_equiv``."""
        return self.loss_from_maps(pair, self.encode(pair.x1), self.encode(pair.x2), keys=keys)

    def loss_from_maps(self, pair: ViewPair, f1: Tensor, f2: Tensor, keys: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
        """``λ·L_equiv`` from layer-L maps of the pair's views obtained by the caller; shape checks, captures untouched."""
        self._live()
        check_pair(pair, f1, f2, self.patch_size, self.layer, self.vit.border(self.layer))
        return self.objective(f1, f2, pair, keys=keys)

    # ------------------------------------------------------------------ settable options, lifecycle
    lam = _objective_option("lam")
    tau = _objective_option("tau")

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_fixed_option(self, name, "ser.remove(), then attach_ser(model, config=dataclasses.replace(ser.config, {name}=...))")
        super().__setattr__(name, value)

    def remove(self) -> None:
        """Removes every hook (and the late-[CLS] conversion): the model is exactly as before attach_ser."""
        if self._tap is not None:
            self._tap.remove()
        self.objective.flush()  # a deferred non-finite check of the last step raises here
        if self._late is not None:
            self._late.remove()
            self._late = None

    def __enter__(self) -> SER:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __getstate__(self) -> Dict[str, Any]:
        """Copies and pickles are detached: no tap, no late-[CLS] handle, no model, no block references."""
        state = dict(super().__getstate__())
        state.update(_tap=None, _late=None, _model=None, vit=dataclasses.replace(self.vit, blocks=(None,) * self.vit.depth))
        return state

    def extra_repr(self) -> str:
        return (f"layer={self.layer}/{self.depth} ({layer_meaning(self.vit, self.layer)}), lam={self.lam}, tau={self.tau}, {self.vit!r}, late_cls={self.config.late_cls}, "
                f"attached={self.is_attached}").replace(f"prefix_tokens={self.vit.num_prefix_tokens}", f"prefix_tokens={self._prefix}")


def attach_ser(model: nn.Module, layer: Optional[int] = None, *, config: Optional[SERConfig] = None, **options: Any) -> SER:
    """Attaches Soft Equivariance Regularization to block ``layer`` of a ViT.

    Args:
        model: a timm, torchvision, HF transformers, DINO/DINOv2-style or lightly ViT (or any model with
            ``blocks=`` given).
        layer: ``L`` — the token map after the first ``L`` blocks (``1..depth``; negative counts from the end);
            or ``config.layer``.
        config: a :class:`SERConfig`, the base.
        **options: ``preset=`` (a name in :data:`~ser_plugin.PRESETS`, applied on top of ``config``), then
            :class:`SERConfig` fields (``lam``, ``tau``, ``head``, ``late_cls``, ``scale``, ``photometric``,
            ``mean``/``std``, ...) on top of both (see :func:`~ser_plugin.config.resolve_config`), and the
            model-description overrides ``blocks``
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
    """Removes every SER attached to ``model`` (for when the handle was lost), and every ser_plugin hook left in it
    by a copy or a pickle (inert capture hooks, a copied late-[CLS] conversion).

    Returns:
        How many live handles were removed.
    """
    taps = live_taps(model)
    for tap in taps:
        tap.owner.remove() if isinstance(tap.owner, SER) else tap.remove()
    remove_tap_hooks(model)
    return len(taps)
