"""The group G = D4 ⋉ scale, acting on images and, analytically, on token maps (ρ_g).

Convention:
    Tensors are laid out ``(B, C, H, W)``; row 0 is the top of the picture, column 0 its left.

    * ``flip``: horizontal flip, the last axis reversed: ``y[..., i, j] = x[..., i, W-1-j]``
      (``torch.flip(x, [-1])``).
    * ``rot^k``: rotation by ``k·90°`` counter-clockwise as the picture is displayed, identical to
      ``torch.rot90(x, k, dims=(-2, -1))``. Odd ``k`` swaps ``H`` and ``W``.
    * ``scale (sy, sx)``: the grid is resampled to ``(round(H·sy), round(W·sx))``.
    * An element ``g = (k, f, s)`` acts as ``g·x = scale_s(rot^k(flip^f(x)))``: flip first, then
      rotate, then resample.
    * Composition ``g.compose(h)`` is ``g ∘ h`` (apply ``h`` first). On the D4 part,
      ``(k1, f1) ∘ (k2, f2) = (k1 + (-1)^f1·k2 mod 4, f1 xor f2)`` since ``flip ∘ rot = rot⁻¹ ∘ flip``.
      Moving a scale past a rotation by an odd ``k`` swaps ``sy`` and ``sx``.

The D4 part is an exact group action (a permutation of grid cells, done as one batched gather with
per-sample elements). The scale part is not a group action on a discrete grid: its composition and
inverse are exact in the algebra (float factors) but its action is a resampling, approximate except for
integer factors with nearest/area resampling.

The same grid transform serves both actions: :func:`act_image` on pixels and :func:`rho` on token maps
``(B, C, h, w)``. With a patch-aligned image and a patchify map Φ, ``Φ(g·x) == ρ_g(Φ(x))`` exactly for
every D4 element (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SERError

__all__ = ["GroupElement", "act_image", "rho", "transform_grid", "D4_ELEMENTS"]

#: The eight D4 elements as ``(rot, flip)`` pairs, identity first.
D4_ELEMENTS: Tuple[Tuple[int, int], ...] = tuple((k, f) for f in (0, 1) for k in range(4))

_MODES = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")


@dataclass(frozen=True)
class GroupElement:
    """A batch of group elements, one per sample.

    Attributes:
        rot: ``(B,)`` int64 in ``0..3``, the number of counter-clockwise quarter turns.
        flip: ``(B,)`` bool, whether the horizontal flip is applied (before the rotation).
        scale: ``(B, 2)`` float64 ``(sy, sx)`` factors applied last (ones for pure D4 elements).

    Example:
        >>> g = GroupElement.from_d4([1, 0], [False, True])
        >>> g.compose(g.inverse()).is_identity()
        True
    """

    rot: Tensor
    flip: Tensor
    scale: Tensor

    def __post_init__(self) -> None:
        if not (isinstance(self.rot, Tensor) and isinstance(self.flip, Tensor) and isinstance(self.scale, Tensor)):
            raise SERError("GroupElement fields must be tensors; build elements with GroupElement.from_d4(rot, flip).")
        if self.rot.dim() != 1 or self.flip.shape != self.rot.shape or self.scale.shape != (self.rot.shape[0], 2):
            raise SERError(
                f"GroupElement shapes disagree: rot {tuple(self.rot.shape)}, flip {tuple(self.flip.shape)}, "
                f"scale {tuple(self.scale.shape)}; expected (B,), (B,) and (B, 2)."
            )

    # ------------------------------------------------------------------ construction
    @staticmethod
    def from_d4(
        rot: Union[Sequence[int], Tensor],
        flip: Union[Sequence[bool], Sequence[int], Tensor],
        scale: Optional[Union[Tuple[float, float], Tensor]] = None,
        device: Optional[Union[str, torch.device]] = None,
    ) -> GroupElement:
        """Builds a batch from per-sample rotations, flips and an optional scale.

        Args:
            rot: ``(B,)`` quarter turns (any integers, reduced mod 4).
            flip: ``(B,)`` flags.
            scale: ``(sy, sx)`` shared by the batch, or a ``(B, 2)`` tensor; default no scaling.
            device: where the tensors live (default: ``rot``'s device).
        """
        try:
            rot_t = torch.as_tensor(rot, device=device).long().reshape(-1) % 4
            dev = rot_t.device
            flip_t = torch.as_tensor(flip, device=dev).bool().reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise SERError(f"rot and flip must be integer sequences or tensors, one entry per sample; got rot={rot!r}, flip={flip!r} ({e}).") from None
        if flip_t.shape != rot_t.shape:
            raise SERError(f"rot has {rot_t.numel()} entries but flip has {flip_t.numel()}; give one of each per sample.")
        n = rot_t.shape[0]
        if scale is None:
            sc = torch.ones(n, 2, dtype=torch.float64, device=dev)
        else:
            try:
                sc = torch.as_tensor(scale, dtype=torch.float64, device=dev)
            except (TypeError, ValueError, RuntimeError) as e:
                raise SERError(f"scale must be (sy, sx) or an (n, 2) tensor of positive numbers, got {scale!r} ({e}).") from None
            if sc.shape == (2,):
                sc = sc.expand(n, 2).clone()
            if sc.shape != (n, 2):
                raise SERError(f"scale must be (sy, sx) or a ({n}, 2) tensor, got shape {tuple(sc.shape)}.")
            if not bool((sc > 0).all() and torch.isfinite(sc).all()):
                raise SERError(f"scale factors must be positive and finite, got {sc.tolist()}.")
        return GroupElement(rot_t, flip_t, sc)

    @staticmethod
    def identity(n: int, device: Optional[Union[str, torch.device]] = None) -> GroupElement:
        """``n`` identity elements."""
        return GroupElement.from_d4(torch.zeros(n, dtype=torch.long, device=device), torch.zeros(n, dtype=torch.bool, device=device))

    @staticmethod
    def random(
        n: int,
        rotations: bool = True,
        flips: bool = True,
        device: Optional[Union[str, torch.device]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> GroupElement:
        """``n`` D4 elements drawn uniformly (from the rotations and/or flips allowed)."""
        gdev = generator.device if generator is not None else device
        rot = torch.randint(0, 4, (n,), generator=generator, device=gdev) if rotations else torch.zeros(n, dtype=torch.long, device=gdev)
        flip = torch.randint(0, 2, (n,), generator=generator, device=gdev).bool() if flips else torch.zeros(n, dtype=torch.bool, device=gdev)
        g = GroupElement(rot, flip, torch.ones(n, 2, dtype=torch.float64, device=gdev))
        return g._moved(device) if device is not None else g

    # ------------------------------------------------------------------ algebra
    def __len__(self) -> int:
        return int(self.rot.shape[0])

    @property
    def device(self) -> torch.device:
        return self.rot.device

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> GroupElement:
        """The elements on ``device``; ``non_blocking=True`` avoids the stream sync of a host-to-device copy."""
        return GroupElement(
            self.rot.to(device, non_blocking=non_blocking),
            self.flip.to(device, non_blocking=non_blocking),
            self.scale.to(device, non_blocking=non_blocking),
        )

    def _moved(self, device: Union[str, torch.device]) -> GroupElement:
        """``to(device)`` without a stream sync: non-blocking host-to-device, blocking toward the host (safe to read)."""
        device = torch.device(device)
        if device == self.rot.device:
            return self
        return self.to(device, non_blocking=device.type != "cpu")

    def __getitem__(self, idx: Union[int, slice, Tensor]) -> GroupElement:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1 if idx != -1 else None)
        return GroupElement(self.rot[idx], self.flip[idx], self.scale[idx])

    @staticmethod
    def cat(elements: Sequence[GroupElement]) -> GroupElement:
        return GroupElement(
            torch.cat([e.rot for e in elements]), torch.cat([e.flip for e in elements]), torch.cat([e.scale for e in elements])
        )

    def _check_same_batch(self, other: GroupElement) -> None:
        if len(self) != len(other):
            raise SERError(f"cannot combine element batches of sizes {len(self)} and {len(other)}; they must match sample by sample.")

    def compose(self, other: GroupElement) -> GroupElement:
        """``self ∘ other``: ``other`` acts first. Per sample."""
        self._check_same_batch(other)
        other = other._moved(self.device)
        sign = torch.where(self.flip, -1, 1)
        rot = (self.rot + sign * other.rot) % 4
        flip = self.flip ^ other.flip
        other_scale = other.scale
        swapped = torch.where((self.rot % 2 == 1)[:, None], other_scale.flip(-1), other_scale)
        return GroupElement(rot, flip, self.scale * swapped)

    def __matmul__(self, other: GroupElement) -> GroupElement:
        return self.compose(other)

    def inverse(self) -> GroupElement:
        """Per-sample inverse: reflections are involutions, rotations negate, scales invert (swapped past odd turns)."""
        rot = torch.where(self.flip, self.rot, (-self.rot) % 4)
        inv_scale = 1.0 / self.scale
        scale = torch.where((self.rot % 2 == 1)[:, None], inv_scale.flip(-1), inv_scale)
        return GroupElement(rot, self.flip.clone(), scale)

    def d4(self) -> GroupElement:
        """The D4 part alone (scale dropped)."""
        return GroupElement(self.rot, self.flip, torch.ones_like(self.scale))

    def is_identity(self, atol: float = 1e-12) -> bool:
        return bool((self.rot == 0).all() and (~self.flip).all() and torch.allclose(self.scale, torch.ones_like(self.scale), atol=atol, rtol=0))

    def equals(self, other: GroupElement, atol: float = 1e-9) -> bool:
        self._check_same_batch(other)
        o = other._moved(self.device)
        return bool((self.rot == o.rot).all() and (self.flip == o.flip).all() and torch.allclose(self.scale, o.scale, atol=atol, rtol=0))

    def has_scale(self) -> bool:
        return not bool(torch.all(self.scale == 1.0))

    def __repr__(self) -> str:
        return f"GroupElement(rot={self.rot.tolist()}, flip={self.flip.int().tolist()}, scale={self.scale.tolist()})"


# ---------------------------------------------------------------------- the grid transform
def to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device`` without a stream sync: host-to-device copies are non-blocking; copies toward the
    host stay blocking (a non-blocking one could be read before it lands)."""
    if t.device == device:
        return t
    return t.to(device, non_blocking=torch.device(device).type != "cpu")


def _d4_gather_index(h: int, w: int, ho: int, wo: int, rot: Tensor, flip: Tensor) -> Tensor:
    """Flat source index of every output cell, per sample: ``y.flatten()[b, t] = x.flatten()[b, idx[b, t]]``.

    ``(ho, wo)`` is the output grid, ``(w, h)`` for odd ``rot`` and ``(h, w)`` for even ones; the caller
    knows it from the shapes, so nothing is read from ``rot``. Built on ``rot``'s device.
    """
    i = torch.arange(ho, device=rot.device).view(1, ho, 1)
    j = torch.arange(wo, device=rot.device).view(1, 1, wo)
    k = rot.view(-1, 1, 1)
    # source (a, b) in the (flipped) input for y = rot^k(x'), derived from torch.rot90's definition
    a = torch.where(k == 0, i, torch.where(k == 1, j, torch.where(k == 2, h - 1 - i, h - 1 - j)))
    b = torch.where(k == 0, j, torch.where(k == 1, w - 1 - i, torch.where(k == 2, w - 1 - j, i)))
    b = torch.where(flip.view(-1, 1, 1), w - 1 - b, b)
    return (a * w + b).reshape(rot.shape[0], ho * wo)


def _d4_index(h: int, w: int, rot: Tensor, flip: Tensor) -> Tuple[Tensor, int, int]:
    """``(index, ho, wo)`` for elements of one parity (reads ``rot[0]``; kept for callers outside the hot path)."""
    odd = int(rot[:1].cpu().item()) % 2 == 1 if rot.numel() else False
    ho, wo = (w, h) if odd else (h, w)
    return _d4_gather_index(h, w, ho, wo, rot, flip), ho, wo


def _apply_d4(x: Tensor, rot: Tensor, flip: Tensor, odd: bool) -> Tensor:
    """Per-sample D4 permutation of the last two axes of ``x`` (B, C, H, W), one gather, no host read.

    ``odd`` says which output shape to build, ``(W, H)`` if True; every ``rot`` must have that parity
    (on a square grid both parities have the same shape and may mix).
    """
    bsz, c, h, w = x.shape
    ho, wo = (w, h) if odd else (h, w)
    idx = _d4_gather_index(h, w, ho, wo, rot, flip)
    out = x.reshape(bsz, c, h * w).gather(2, idx[:, None, :].expand(bsz, c, ho * wo))
    return out.reshape(bsz, c, ho, wo)


def _resize(x: Tensor, size: Tuple[int, int], mode: str, antialias: bool) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kw = {}
    if mode in ("bilinear", "bicubic"):
        kw = {"align_corners": False, "antialias": antialias}
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        return F.interpolate(x.float(), size=size, mode=mode, **kw).to(x.dtype)
    return F.interpolate(x, size=size, mode=mode, **kw)


def _check_map(x: Tensor, what: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise SERError(f"{what} must be a (B, C, H, W) tensor, got {shape}.")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise SERError(f"{what} has an empty grid {tuple(x.shape)}; H and W must be positive.")


def _size_from_scale(g: GroupElement, h: int, w: int) -> Tuple[int, int]:
    """The output grid implied by ``g.scale`` (one host read of the elements: free when they live on the CPU)."""
    rot = g.rot.cpu().tolist()
    scale = g.scale.cpu().tolist()
    hs = sorted({int(round((w if r % 2 else h) * sc[0])) for r, sc in zip(rot, scale)})
    ws = sorted({int(round((h if r % 2 else w) * sc[1])) for r, sc in zip(rot, scale)})
    if len(hs) != 1 or len(ws) != 1:
        raise SERError(
            f"the elements map the ({h}, {w}) grid to different sizes across the batch (heights {hs}, "
            f"widths {ws}); a batch needs one output size: pass size=(H, W) or use one scale per batch."
        )
    return hs[0], ws[0]


def transform_grid(
    x: Tensor,
    g: GroupElement,
    size: Optional[Tuple[int, int]] = None,
    mode: str = "bilinear",
    antialias: bool = False,
    *,
    parity: Optional[bool] = None,
) -> Tensor:
    """Applies per-sample elements ``g`` to a batch of grids ``x`` (B, C, H, W).

    The D4 part is an exact permutation; the scale part (or an explicit ``size``) resamples the grid to
    one output size for the whole batch. With ``size`` given, nothing is read back from ``g`` or ``x``
    (no host sync on a GPU): only ``g``'s rotation and flip move to ``x``'s device (non-blocking) to build
    the gather index there. On a non-square grid the odd and even rotations cannot share one permutation,
    so both are computed for the whole batch and selected per sample, unless ``parity`` says which.

    Args:
        x: ``(B, C, H, W)``.
        g: ``B`` elements, on any device (the CPU is cheapest).
        size: output ``(H_out, W_out)``; default: from ``g.scale`` (rounded), which must agree across the
            batch. Computing it reads ``g.scale`` on the host (free for CPU elements).
        mode: resampling for the scale part: nearest, nearest-exact, bilinear, bicubic or area.
        antialias: antialias when downsampling (bilinear/bicubic).
        parity: ``False``/``True`` if the caller knows every rotation is even/odd (skips the other branch
            on non-square grids); ``None`` (default) for mixed or unknown.

    Returns:
        The transformed grids.

    Shape:
        ``(B, C, H, W) -> (B, C, H_out, W_out)``.

    Raises:
        SERError: shapes and elements disagree, or the scales imply different sizes across the batch.
    """
    _check_map(x, "the input")
    if len(g) != x.shape[0]:
        raise SERError(f"{len(g)} group elements for a batch of {x.shape[0]} (input {tuple(x.shape)}); give one element per sample.")
    if mode not in _MODES:
        raise SERError(f"unknown resampling mode {mode!r}; use one of {_MODES}.")
    bsz, _, h, w = x.shape
    if bsz == 0:
        return x
    if size is None:
        size = _size_from_scale(g, h, w)
    size = (int(size[0]), int(size[1]))
    if size[0] < 1 or size[1] < 1:
        raise SERError(f"output size {size} is empty; scale factors too small for a ({h}, {w}) grid.")
    rot, flip = to_device(g.rot, x.device), to_device(g.flip, x.device)
    if h == w:
        # a square grid keeps its shape under every D4 element: permute exactly, then resample
        # (g·x = scale(rot(flip(x))): the scale acts last)
        return _resize(_apply_d4(x, rot, flip, odd=False), size, mode, antialias)
    if parity is not None:
        pre = (size[1], size[0]) if parity else size
        return _apply_d4(_resize(x, pre, mode, antialias), rot, flip, odd=parity)
    # non-square grid, parities unknown: both branches for the whole batch, selected per sample (no host read)
    even = _apply_d4(_resize(x, size, mode, antialias), rot & 2, flip, odd=False)
    odd = _apply_d4(_resize(x, (size[1], size[0]), mode, antialias), rot | 1, flip, odd=True)
    return torch.where((rot % 2 == 1).view(-1, 1, 1, 1), odd, even)


def act_image(
    x: Tensor,
    g: GroupElement,
    size: Optional[Tuple[int, int]] = None,
    mode: str = "bilinear",
    antialias: bool = True,
    *,
    parity: Optional[bool] = None,
) -> Tensor:
    """The image action ``g·x`` on pixels (B, C, H, W); see the module's convention.

    Example:
        >>> x = torch.arange(4.).view(1, 1, 2, 2)
        >>> torch.equal(act_image(x, GroupElement.from_d4([1], [0])), torch.rot90(x, 1, (-2, -1)))
        True
    """
    return transform_grid(x, g, size=size, mode=mode, antialias=antialias, parity=parity)


def rho(
    tokens: Tensor, g: GroupElement, size: Optional[Tuple[int, int]] = None, mode: str = "bilinear", *, parity: Optional[bool] = None
) -> Tensor:
    """The token-map action ρ_g on ``(B, C, h, w)`` maps: exact permutation for D4, resampling for scale.

    ``size`` is the target grid; give it whenever it is known (e.g. the other view's captured grid), since
    rounding ``h·sy`` may differ by one from the grid the image action produced.
    """
    return transform_grid(tokens, g, size=size, mode=mode, antialias=False, parity=parity)
