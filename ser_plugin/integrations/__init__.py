"""Helpers shared by the training-loop adapters (MoCo-v3, DINO, solo-learn, DINOv2, Lightning, lightly).

The adapters keep the *matched 2-view budget* of docs/method.md §7: for the ``b2`` images of a batch, the two
equivariant views **replace** the host's two usual views, so they also enter the host's unchanged SSL
loss, and layer L's token maps are taken from the host's own forward passes (no extra encoder pass)::

    n = b2_count(batch_size, cfg.b2_share)                # |b2|
    pair = ser.views(views_input(base[-n:], ser.config.mean, ser.config.std))  # base: plain crops of the same images
    x1, x2 = replace_rows(x1, pair.x1), replace_rows(x2, pair.x2)
    with ser.capture():
        host_loss = host(x1, x2)                          # the host's forward, untouched
    f1, f2 = b2_maps(ser.captures, n)                     # b2 rows of the two captured passes
    ser.clear()
    loss = host_loss + loss_from_maps(ser, pair, f1, f2)

:func:`loss_from_maps` is :meth:`SER.loss` for maps the caller sliced out of larger captures (same checks,
same ``last_loss``, same λ=0 behaviour). :class:`BaseCrop` is the loader-side "plain crop" that the views
are made from. The launchers' SER options come from one :class:`~ser_plugin.SERConfig`: argparse flags
generated from it (:func:`add_ser_args` / :func:`config_from_args`), a structured config for Hydra/OmegaConf
(:data:`SERStructuredConfig` / :func:`config_from_structured`), and the per-host recipes :data:`HOST_RECIPES`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..attach import SER
from ..errors import SERError
from ..views import ViewPair
from .options import HOST_RECIPES, SERStructuredConfig, add_ser_args, config_from_args, config_from_structured, recipe, structured

__all__ = [
    "b2_count",
    "replace_rows",
    "loss_from_maps",
    "BaseCrop",
    "views_input",
    "average_grads_across_ranks",
    "b2_maps",
    "add_ser_args",
    "config_from_args",
    "SERStructuredConfig",
    "config_from_structured",
    "HOST_RECIPES",
    "recipe",
    "structured",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def b2_count(batch_size: int, share: float) -> int:
    """``|b2|`` for a (per-process) batch: ``round(share · batch_size)``, at least 2 (the loss needs another image
    for negatives), at most ``batch_size``.

    Example:
        >>> b2_count(256, 0.01), b2_count(8, 0.25)
        (3, 2)
    """
    if not (0 < share <= 1):
        raise SERError(f"the b2 share must be in (0, 1], got {share!r} (paper: 0.01 at batch 4096; use 0.1-0.25 for small batches).")
    if batch_size < 2:
        raise SERError(f"a batch of {batch_size} images cannot hold a b2 of 2 images; use a larger batch.")
    return int(min(batch_size, max(2, round(share * batch_size))))


def replace_rows(x: Tensor, rows: Tensor) -> Tensor:
    """``x`` with its last ``len(rows)`` rows replaced by ``rows`` (a new tensor; dtype, device and memory
    format of ``x`` kept). The b2 images are the last rows of the batch by convention."""
    n = rows.shape[0]
    if tuple(rows.shape[1:]) != tuple(x.shape[1:]):
        raise SERError(
            f"the b2 views {tuple(rows.shape)} cannot replace rows of the host's views {tuple(x.shape)}: same image size needed "
            "(scale views change the size; use D4 views, scale=None, when views replace the host's rows)."
        )
    if n > x.shape[0]:
        raise SERError(f"{n} b2 views for a batch of {x.shape[0]} images.")
    out = x.clone()
    out[x.shape[0] - n :] = rows.to(device=x.device, dtype=x.dtype)
    return out


def b2_maps(captures: Sequence[Tensor], n: int, *, concatenated: bool = False, exact: bool = False) -> Tuple[Tensor, Tensor]:
    """The layer-L maps of the ``n`` b2 images (the last ``n`` rows of each view) out of the host's captures.

    Args:
        captures: the maps recorded during the host's step (``ser.captures``), each ``(B_i, C, h, w)``.
        n: ``|b2|``, the number of views that replaced the last rows of each view's batch.
        concatenated: ``False``: ``captures[0]`` is the pass over view 1, ``captures[1]`` the pass over view 2
            (further passes — e.g. local crops — are ignored unless ``exact``). ``True``: ``captures[0]`` is
            one pass over both views concatenated (rows: all of view 1, then all of view 2), as DINO's
            ``MultiCropWrapper`` does.
        exact: refuse captures beyond the ones used (a host expected to run the encoder exactly that often).

    Returns:
        ``(f1, f2)``, each ``(n, C, h, w)``.

    Raises:
        SERError: too few or too many captures, an odd concatenated batch, or fewer than ``n`` rows.

    Example:
        >>> a, b = torch.zeros(8, 4, 2, 2), torch.ones(8, 4, 2, 2)
        >>> [tuple(f.shape) for f in b2_maps([a, b], 2)]
        [(2, 4, 2, 2), (2, 4, 2, 2)]
    """
    shapes = [tuple(c.shape) for c in captures]
    need = 1 if concatenated else 2
    if len(captures) < need or (exact and len(captures) != need):
        what = "one pass over both views concatenated" if concatenated else "one pass per view (view 1, then view 2)"
        raise SERError(
            f"expected {need} captured pass(es) at layer L ({what}), got {len(captures)} with shapes {shapes}; "
            + ("the host ran the encoder more often than expected." if len(captures) > need else "did the host's step run the hooked (online) encoder inside ser.capture()?")
        )
    if concatenated:
        c = captures[0]
        if c.shape[0] % 2:
            raise SERError(f"concatenated=True expects an even number of rows (view 1 then view 2) in the first capture, got {shapes[0]}.")
        b = c.shape[0] // 2
        if n > b:
            raise SERError(f"{n} b2 views but each view has {b} rows in the concatenated capture {shapes[0]}.")
        return c[b - n : b], c[2 * b - n :]
    c1, c2 = captures[0], captures[1]
    if n > min(c1.shape[0], c2.shape[0]):
        raise SERError(f"{n} b2 views but the captured passes have {c1.shape[0]} and {c2.shape[0]} rows ({shapes[:2]}).")
    return c1[c1.shape[0] - n :], c2[c2.shape[0] - n :]


def loss_from_maps(ser: SER, pair: ViewPair, f1: Tensor, f2: Tensor, keys: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """``λ·L_equiv`` from layer-L maps ``f1``, ``f2`` of the pair's two views, sliced by the caller out of
    larger captures (b1 ∪ b2 in one host pass). Same checks and bookkeeping as :meth:`SER.loss`.

    Shape:
        ``f1, f2``: ``(n, C, h, w)`` with ``n = len(pair.g1)``.
    """
    if ser.captures:
        raise SERError(
            f"{len(ser.captures)} unconsumed capture(s) on this SER handle; call ser.clear() after slicing the maps out of "
            "ser.captures, so that they are not mixed into the next step."
        )
    return ser.loss_from_maps(pair, f1, f2, keys=keys)


class BaseCrop:
    """Loader-side plain crop the b2 views are made from: random-resized crop, as ``uint8`` (C, H, W).

    No photometric augmentation and no flip (the view policy adds those); uint8 keeps the extra loader
    output at 1 byte per pixel. On the device: ``x = base.float() / 255`` then ``ser.views(x)``.

    Args:
        size: output side (the host's global crop size, e.g. 224).
        scale: area range of the crop (the host's own range for its global crops).
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.08, 1.0)) -> None:
        from torchvision import transforms

        self.size = size
        self.scale = tuple(scale)
        self._t = transforms.Compose(
            [transforms.RandomResizedCrop(size, scale=self.scale, interpolation=transforms.InterpolationMode.BICUBIC), transforms.PILToTensor()]
        )

    def __call__(self, image: Any) -> Tensor:
        out = self._t(image.convert("RGB") if hasattr(image, "convert") else image)
        return out

    def __repr__(self) -> str:
        return f"BaseCrop(size={self.size}, scale={self.scale})"


def _base_to_float(base: Tensor) -> Tensor:
    """``uint8`` crops from :class:`BaseCrop` → float images in ``[0, 1]``."""
    return base.float().div_(255) if base.dtype == torch.uint8 else base.float()


def views_input(base: Tensor, mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> Tensor:
    """Plain crops (``uint8``, or float in ``[0, 1]``) → the input ``ser.views`` expects under its config: with
    ``mean``/``std`` (the config's), normalised ``(x - mean) / std`` — the views de-normalise, augment and
    normalise again, so they come out like the host's normalised crops; without them, ``[0, 1]`` floats.

    Example:
        >>> pair = ser.views(views_input(base[-n:], ser.config.mean, ser.config.std))  # doctest: +SKIP
    """
    x = _base_to_float(base)
    if mean is None or std is None:
        return x
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def average_grads_across_ranks(module: nn.Module) -> List[Any]:
    """Gradient hooks that average ``module``'s gradients over ranks, for SER parameters that live outside
    the host's DDP wrapper (e.g. the token head in DINO, whose student must not own foreign parameters).
    A no-op without an initialised process group. Returns the hook handles."""
    import torch.distributed as dist

    handles = []
    for p in module.parameters():
        if not p.requires_grad:
            continue

        def _avg(g: Tensor) -> Tensor:
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                g = g.clone()
                dist.all_reduce(g)
                g /= dist.get_world_size()
            return g

        handles.append(p.register_hook(_avg))
    return handles

