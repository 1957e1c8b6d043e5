"""SERConfig: every option of SER in one typed, validated dataclass.

``attach_ser(model, layer, **options)`` builds one; the adapters and the Lightning callback accept one.
Bad values raise :class:`~ser_plugin.errors.SERError` naming the field, the value and what is allowed;
numpy and 0-d tensor scalars are accepted and stored as Python numbers.

Example:
    >>> cfg = SERConfig(layer=6, lam=0.5, head=True)
    >>> cfg = SERConfig.from_kwargs(layer=6, tau=0.3)          # unknown names -> SERError listing valid ones
    >>> cfg = SERConfig.preset("authors", layer=6)             # the SER authors' choices, overridable
    >>> dataclasses.replace(cfg, lam=0.0).lam
    0.0
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Optional, Tuple, Union

from torch import nn

from .errors import SERError
from .loss import DEFAULT_CHUNK_ELEMENTS

__all__ = ["SERConfig", "PRESETS", "NOT_CONFIG_OPTIONS"]

#: named presets: field values applied before the caller's overrides
PRESETS: Dict[str, Dict[str, Any]] = {
    "authors": dict(
        photometric="authors",
        pairing="authors",
        image_interpolation="bicubic",
        interpolation="bicubic",
        scale=(0.7, 1.3),
        head=True,
        late_cls=True,
        scale_frame="view1",
    ),
}

#: attach_ser keyword arguments that describe the model rather than SER (not config fields)
NOT_CONFIG_OPTIONS = ("blocks", "patch_size", "num_prefix_tokens", "forward", "preset")

_INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
_PAIRINGS = ("independent", "no_identity", "authors")
_IMAGE_INTERPOLATIONS = ("bilinear", "bicubic")
_SCALE_FRAMES = ("view2", "view1")
_PHOTOMETRIC_NAMES = ("mocov3", "authors")


def _scalar(v: Any) -> Any:
    """numpy scalars and 0-d tensors → Python numbers/bools; anything else unchanged."""
    if hasattr(v, "item") and tuple(getattr(v, "shape", (1,))) == ():
        try:
            return v.item()
        except (ValueError, RuntimeError, TypeError):
            return v
    return v


def _bad(name: str, value: Any, allowed: str) -> SERError:
    return SERError(f"SERConfig.{name}={value!r} is not allowed: {name} must be {allowed}.")


def _bool(name: str, v: Any) -> bool:
    v = _scalar(v)
    if not isinstance(v, bool):
        raise _bad(name, v, "True or False")
    return v


def _number(name: str, v: Any, *, lo: float, lo_open: bool, allowed: str) -> float:
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (lo_open and v == lo):
        raise _bad(name, v, allowed)
    return float(v)


def _int(name: str, v: Any, *, minimum: int, allowed: str) -> int:
    v = _scalar(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _bad(name, v, allowed)
    return int(v)


def _range(name: str, v: Any, allowed: str) -> Tuple[float, float]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise _bad(name, v, allowed)
    lo, hi = (_scalar(t) for t in v)
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in (lo, hi)) or not (0 < lo <= hi):
        raise _bad(name, v, allowed)
    return (float(lo), float(hi))


def _choice(name: str, v: Any, choices: Tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise _bad(name, v, "one of " + ", ".join(repr(c) for c in choices))
    return v


def _floats(name: str, v: Any, positive: bool) -> Tuple[float, ...]:
    allowed = "None or a sequence of finite per-channel numbers" + (" > 0" if positive else "") + ", e.g. (0.485, 0.456, 0.406)"
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) == 0:
        raise _bad(name, v, allowed)
    try:
        out = tuple(float(_scalar(t)) for t in v)
    except (TypeError, ValueError):
        raise _bad(name, v, allowed) from None
    if any(isinstance(_scalar(t), bool) for t in v) or not all(math.isfinite(t) for t in out) or (positive and min(out) <= 0):
        raise _bad(name, v, allowed)
    return out


@dataclass
class SERConfig:
    """All options of Soft Equivariance Regularization.

    Attributes:
        layer: ``L``, the block whose output is regularised (``1..depth``, negative counts from the end);
            ``attach_ser(model, layer)`` may give it positionally instead.
        lam: λ, weight of L_equiv in the total loss (finite, ``>= 0``; ``0`` computes and logs it without gradient).
        tau: τ, InfoNCE temperature (finite, ``> 0``; paper 0.3-0.5).
        head: ``True`` builds a token head (LayerNorm + MLP ``head_dims``) owned by the handle; or your own
            ``nn.Module`` applied token-wise; ``False`` for none.
        head_dims: ``(hidden, out)`` widths of the built token head.
        symmetric: average the view1→view2 and view2→view1 directions.
        same_branch_negatives: also use the query branch's other-image tokens as negatives.
        max_negatives: bound on the negative pool per direction (``None``: every other-image token).
        gather: ``"auto"`` gathers keys across ranks when torch.distributed is initialised; ``True``/``False`` force it.
        interpolation: token-map resampler of ρ's scale part: ``"bilinear"``, ``"bicubic"``, ``"nearest"``, ``"area"``.
        scale: ``None`` for D4 views only, or the token-area range of scale views, e.g. ``(0.7, 1.3)``.
        ratio: aspect-ratio range of scale views (``0 < lo <= hi``).
        rotations: draw quarter turns for the views.
        flips: draw horizontal flips for the views.
        photometric: ``"mocov3"``, ``"authors"``, ``None`` or a pair of callables ``(p1, p2)`` on ``[0, 1]`` images.
        mean: per-channel mean; with ``std``, views are normalised after augmentation (inputs in ``[0, 1]``).
        std: per-channel std (``> 0``), same length as ``mean``.
        late_cls: the paper's late [CLS] insertion after block ``L`` (blocks ``1..L`` see patch tokens only).
        check_finite: a non-finite L_equiv raises (one host sync per step).
        chunk_elements: similarity entries processed at once (memory knob; result unchanged).
        pairing: how the two views' elements are drawn: ``"independent"``, ``"no_identity"`` or ``"authors"``.
        image_interpolation: image resampler of scale views: ``"bilinear"`` or ``"bicubic"``.
        scale_frame: frame of the second direction under scale: ``"view2"`` or ``"view1"`` (authors).
        b2_share: share of the batch used as ``b2`` by the adapters and the Lightning callback (``0 < s <= 1``).

    Raises:
        SERError: on construction (and on ``dataclasses.replace``) for any field with a value outside the above.
    """

    layer: Optional[int] = None
    lam: float = 1.0
    tau: float = 0.4
    head: Union[bool, nn.Module] = False
    head_dims: Tuple[int, int] = (512, 512)
    symmetric: bool = True
    same_branch_negatives: bool = False
    max_negatives: Optional[int] = None
    gather: Union[str, bool] = "auto"
    interpolation: str = "bilinear"
    scale: Optional[Tuple[float, float]] = None
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    rotations: bool = True
    flips: bool = True
    photometric: Union[str, None, Tuple[Callable[..., Any], Callable[..., Any]]] = "mocov3"
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None
    late_cls: bool = False
    check_finite: bool = True
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    pairing: str = "independent"
    image_interpolation: str = "bilinear"
    scale_frame: str = "view2"
    b2_share: float = 0.25

    def __post_init__(self) -> None:
        layer = _scalar(self.layer)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise _bad("layer", layer, "an int (1..depth, or -depth..-1 from the end) or None")
        self.layer = layer
        self.lam = _number("lam", self.lam, lo=0.0, lo_open=False, allowed="a finite number >= 0")
        self.tau = _number("tau", self.tau, lo=0.0, lo_open=True, allowed="a finite number > 0")
        head = _scalar(self.head)
        if not isinstance(head, (bool, nn.Module)):
            raise _bad("head", head, "True, False or a token-wise nn.Module")
        self.head = head
        hd = self.head_dims
        if isinstance(hd, (str, bytes)) or not hasattr(hd, "__len__") or len(hd) != 2:
            raise _bad("head_dims", hd, "a pair of positive ints (hidden, out)")
        self.head_dims = (_int("head_dims", hd[0], minimum=1, allowed="a pair of positive ints (hidden, out)"),
                          _int("head_dims", hd[1], minimum=1, allowed="a pair of positive ints (hidden, out)"))
        for name in ("symmetric", "same_branch_negatives", "rotations", "flips", "late_cls", "check_finite"):
            setattr(self, name, _bool(name, getattr(self, name)))
        if self.max_negatives is not None:
            self.max_negatives = _int("max_negatives", self.max_negatives, minimum=1, allowed="None or a positive int")
        gather = _scalar(self.gather)
        if not (isinstance(gather, bool) or gather == "auto"):
            raise _bad("gather", gather, "'auto', True or False")
        self.gather = gather
        self.interpolation = _choice("interpolation", self.interpolation, _INTERPOLATIONS)
        if self.scale is not None:
            self.scale = _range("scale", self.scale, "None or an area range (lo, hi) with 0 < lo <= hi, e.g. (0.7, 1.3)")
        self.ratio = _range("ratio", self.ratio, "an aspect-ratio range (lo, hi) with 0 < lo <= hi, e.g. (3/4, 4/3)")
        ph = self.photometric
        if isinstance(ph, list):
            ph = tuple(ph)
        if not (ph is None or (isinstance(ph, str) and ph in _PHOTOMETRIC_NAMES) or (isinstance(ph, tuple) and len(ph) == 2 and all(callable(p) for p in ph))):
            raise _bad("photometric", ph, "'mocov3', 'authors', None or a pair of callables (p1, p2)")
        self.photometric = ph
        if self.mean is not None:
            self.mean = _floats("mean", self.mean, positive=False)
        if self.std is not None:
            self.std = _floats("std", self.std, positive=True)
        if (self.mean is None) != (self.std is None):
            raise SERError(f"SERConfig: mean={self.mean!r} and std={self.std!r}: give both (per-channel, same length) or neither.")
        if self.mean is not None and len(self.mean) != len(self.std):  # type: ignore[arg-type]
            raise SERError(f"SERConfig: mean has {len(self.mean)} channels and std {len(self.std)}; give one value per channel in each.")  # type: ignore[arg-type]
        self.chunk_elements = _int("chunk_elements", self.chunk_elements, minimum=1, allowed="a positive int")
        self.pairing = _choice("pairing", self.pairing, _PAIRINGS)
        self.image_interpolation = _choice("image_interpolation", self.image_interpolation, _IMAGE_INTERPOLATIONS)
        self.scale_frame = _choice("scale_frame", self.scale_frame, _SCALE_FRAMES)
        b2 = _number("b2_share", self.b2_share, lo=0.0, lo_open=True, allowed="a share in (0, 1]")
        if b2 > 1:
            raise _bad("b2_share", self.b2_share, "a share in (0, 1]")
        self.b2_share = b2

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The public option names, in declaration order."""
        return tuple(f.name for f in fields(cls) if not f.name.startswith("_"))

    @classmethod
    def check_names(cls, names: Any, also: Tuple[str, ...] = ()) -> None:
        """Raises SERError for any name that is neither a field nor in ``also``, listing the valid names.

        Raises:
            SERError: an unknown option name (with the closest valid name when there is one).
        """
        valid = cls.field_names() + tuple(also)
        unknown = [n for n in names if n not in valid]
        if unknown:
            hints = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(n, valid, n=1)) else repr(n) for n in unknown]
            raise SERError(f"unknown SER option(s) {', '.join(hints)}; valid names: {', '.join(valid)}.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SERConfig:
        """``SERConfig(**kwargs)`` that names the valid options when one is unknown (a typo).

        Raises:
            SERError: an unknown name, or a bad value.
        """
        cls.check_names(kwargs)
        return cls(**kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SERConfig:
        """A named preset (see :data:`PRESETS`) with ``overrides`` applied on top.

        Args:
            name: ``"authors"`` — the SER authors' code: authors' photometrics and pairing, bicubic
                resampling, scale views ``(0.7, 1.3)``, token head, late [CLS], view-1 frame under scale.
            **overrides: any field.

        Raises:
            SERError: an unknown preset or option name, or a bad value.
        """
        if name not in PRESETS:
            raise SERError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))}.")
        return cls.from_kwargs(**{**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> SERConfig:
        """``dataclasses.replace`` with the typo check of :meth:`from_kwargs`."""
        self.check_names(changes)
        return dataclasses.replace(self, **changes)
