"""The allowed values of SER's options and their checks, stated once.

:class:`~ser_plugin.SERConfig` validates every field with these checks; the components that take the same
options directly (:class:`~ser_plugin.EquivariantViews`, :class:`~ser_plugin.TokenInfoNCE`,
:class:`~ser_plugin.photometric.BatchedPhotometric`) use the same checks when a user builds them by hand,
and skip them when they are built from an already validated config. So a value has one rule and one
error message wherever it is given.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

from .errors import SERError

__all__ = [
    "INTERPOLATIONS",
    "IMAGE_INTERPOLATIONS",
    "PAIRINGS",
    "SCALE_FRAMES",
    "PHOTOMETRIC_VARIANTS",
]

#: token-map resamplers of ρ's scale part (``interpolation``)
INTERPOLATIONS: Tuple[str, ...] = ("bilinear", "bicubic", "nearest", "area")
#: image resamplers of scale views (``image_interpolation``)
IMAGE_INTERPOLATIONS: Tuple[str, ...] = ("bilinear", "bicubic")
#: how the two views' elements are drawn (``pairing``)
PAIRINGS: Tuple[str, ...] = ("independent", "no_identity", "authors")
#: frame of the second direction under scale (``scale_frame``)
SCALE_FRAMES: Tuple[str, ...] = ("view2", "view1")
#: the built-in photometric recipes (``photometric``)
PHOTOMETRIC_VARIANTS: Tuple[str, ...] = ("mocov3", "authors")


def scalar(v: Any) -> Any:
    """numpy scalars and 0-d tensors → Python numbers/bools; anything else unchanged."""
    if hasattr(v, "item") and tuple(getattr(v, "shape", (1,))) == ():
        try:
            return v.item()
        except (ValueError, RuntimeError, TypeError):
            return v
    return v


def bad(name: str, value: Any, allowed: str, owner: str = "SERConfig") -> SERError:
    return SERError(f"{owner}.{name}={value!r} is not allowed: {name} must be {allowed}.")


def check_bool(name: str, v: Any, owner: str = "SERConfig") -> bool:
    v = scalar(v)
    if not isinstance(v, bool):
        raise bad(name, v, "True or False", owner)
    return v


def check_number(name: str, v: Any, *, lo: float, lo_open: bool, allowed: str, owner: str = "SERConfig") -> float:
    v = scalar(v)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo or (lo_open and v == lo):
        raise bad(name, v, allowed, owner)
    return float(v)


def check_tau(v: Any, owner: str = "SERConfig") -> float:
    return check_number("tau", v, lo=0.0, lo_open=True, allowed="a finite number > 0", owner=owner)


def check_int(name: str, v: Any, *, minimum: int, allowed: str, owner: str = "SERConfig") -> int:
    v = scalar(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise bad(name, v, allowed, owner)
    return int(v)


def check_optional_int(name: str, v: Any, owner: str = "SERConfig") -> Optional[int]:
    return None if v is None else check_int(name, v, minimum=1, allowed="None or a positive int", owner=owner)


def check_range(name: str, v: Any, allowed: str, owner: str = "SERConfig") -> Tuple[float, float]:
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise bad(name, v, allowed, owner)
    lo, hi = (scalar(t) for t in v)
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in (lo, hi)) or not (0 < lo <= hi):
        raise bad(name, v, allowed, owner)
    return (float(lo), float(hi))


def check_scale(v: Any, owner: str = "SERConfig") -> Optional[Tuple[float, float]]:
    return None if v is None else check_range("scale", v, "None or an area range (lo, hi) with 0 < lo <= hi, e.g. (0.7, 1.3)", owner)


def check_ratio(v: Any, owner: str = "SERConfig") -> Tuple[float, float]:
    return check_range("ratio", v, "an aspect-ratio range (lo, hi) with 0 < lo <= hi, e.g. (3/4, 4/3)", owner)


def check_choice(name: str, v: Any, choices: Tuple[str, ...], owner: str = "SERConfig") -> str:
    if not isinstance(v, str) or v not in choices:
        raise bad(name, v, "one of " + ", ".join(repr(c) for c in choices), owner)
    return v


def check_gather(v: Any, owner: str = "SERConfig") -> Any:
    v = scalar(v)
    if not (isinstance(v, bool) or v == "auto"):
        raise bad("gather", v, "'auto', True or False", owner)
    return v


def check_photometric(v: Any, owner: str = "SERConfig") -> Any:
    if isinstance(v, list):
        v = tuple(v)
    if not (v is None or (isinstance(v, str) and v in PHOTOMETRIC_VARIANTS) or (isinstance(v, tuple) and len(v) == 2 and all(callable(p) for p in v))):
        raise bad("photometric", v, " or ".join([", ".join(repr(p) for p in PHOTOMETRIC_VARIANTS), "None", "a pair of callables (p1, p2)"]), owner)
    return v


def check_floats(name: str, v: Any, positive: bool, owner: str = "SERConfig") -> Tuple[float, ...]:
    allowed = "None or a sequence of finite per-channel numbers" + (" > 0" if positive else "") + ", e.g. (0.485, 0.456, 0.406)"
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) == 0:
        raise bad(name, v, allowed, owner)
    try:
        out = tuple(float(scalar(t)) for t in v)
    except (TypeError, ValueError):
        raise bad(name, v, allowed, owner) from None
    if any(isinstance(scalar(t), bool) for t in v) or not all(math.isfinite(t) for t in out) or (positive and min(out) <= 0):
        raise bad(name, v, allowed, owner)
    return out


def check_mean_std(mean: Any, std: Any, owner: str = "SERConfig") -> Tuple[Optional[Tuple[float, ...]], Optional[Tuple[float, ...]]]:
    """Both or neither, one value per channel in each, std > 0."""
    mean = None if mean is None else check_floats("mean", mean, positive=False, owner=owner)
    std = None if std is None else check_floats("std", std, positive=True, owner=owner)
    if (mean is None) != (std is None):
        raise SERError(f"{owner}: mean={mean!r} and std={std!r}: give both (per-channel, same length) or neither.")
    if mean is not None and std is not None and len(mean) != len(std):
        raise SERError(f"{owner}: mean has {len(mean)} channels and std {len(std)}; give one value per channel in each.")
    return mean, std


def check_pairing(pairing: Any, rotations: bool, flips: bool, owner: str = "SERConfig") -> str:
    """A known pairing that the allowed D4 parts can draw."""
    pairing = check_choice("pairing", pairing, PAIRINGS, owner)
    if pairing == "no_identity" and not (rotations or flips):
        raise SERError(f"{owner}: pairing='no_identity' needs rotations=True or flips=True: with neither, the identity is the only element.")
    if pairing == "authors" and not (rotations and flips):
        raise SERError(f"{owner}: pairing='authors' draws quarter turns and flips; it needs rotations=True and flips=True (got {rotations}, {flips}).")
    return pairing
