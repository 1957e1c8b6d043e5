"""The equivariant-view policy T_eq: two views per image, photometric then geometric, elements returned.

``x_i = g_i · p_i(x)``: ``p_i`` photometric only (colour jitter, grayscale, blur, solarize; never
geometric), ``g_i`` from G (per-sample D4; one scale per view per batch). No crop between the two views,
so view 2 is ``g · view 1`` up to photometrics, with ``g = g2 ∘ g1⁻¹`` (:attr:`ViewPair.relative`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .errors import SERError
from .group import GroupElement, act_image

__all__ = ["ViewPair", "EquivariantViews", "ViewTransform", "mocov3_photometric", "collate_views", "rescale_pair"]

Photometric = Optional[Callable[[Tensor], Tensor]]


class ViewPair(NamedTuple):
    """Two equivariant views of the same images and the elements that made them.

    Attributes:
        x1, x2: ``(n, C, H1, W1)`` and ``(n, C, H2, W2)`` views.
        g1, g2: the per-sample elements applied to each view.
    """

    x1: Tensor
    x2: Tensor
    g1: GroupElement
    g2: GroupElement

    @property
    def relative(self) -> GroupElement:
        """``g = g2 ∘ g1⁻¹``, so that ``g2·x = g·(g1·x)``: it maps view 1's frame into view 2's."""
        return self.g2.compose(self.g1.inverse())

    def to(self, device: Union[str, torch.device], non_blocking: bool = False) -> ViewPair:
        return ViewPair(self.x1.to(device, non_blocking=non_blocking), self.x2.to(device, non_blocking=non_blocking), self.g1.to(device), self.g2.to(device))


def mocov3_photometric(image_size: int = 224, second: bool = False) -> nn.Module:
    """MoCo-v3's asymmetric photometric augmentations as a kornia pipeline (no geometric part).

    View 1: colour jitter (0.4, 0.4, 0.2, 0.1, p=0.8), grayscale p=0.2, Gaussian blur p=1.0.
    View 2: the same jitter and grayscale, blur p=0.1, solarize p=0.2. Inputs in ``[0, 1]``.
    The blur kernel is about 10% of the image side (23 px at 224), as in MoCo-v3.
    """
    import kornia.augmentation as K

    k = max(3, int(round(0.1 * image_size)) | 1)
    augs = [
        K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((k, k), (0.1, 2.0), p=0.1 if second else 1.0),
    ]
    if second:
        augs.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=0.2))
    return nn.Sequential(*augs)


def _sample_scale_size(
    h: int, w: int, patch: int, area: Tuple[float, float], ratio: Tuple[float, float], generator: Optional[torch.Generator]
) -> Tuple[int, int]:
    u = torch.rand(2, generator=generator).tolist()
    a = area[0] + (area[1] - area[0]) * u[0]
    r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    hh = max(1, int(round(h * math.sqrt(a * r) / patch))) * patch
    ww = max(1, int(round(w * math.sqrt(a / r) / patch))) * patch
    return hh, ww


class EquivariantViews(nn.Module):
    """Makes two equivariant views of an image batch on its device (kornia + the group action).

    Args:
        patch_size: the ViT's patch size; scaled views are sized to multiples of it.
        rotations: draw quarter turns (needs square images when odd and even turns mix).
        flips: draw horizontal flips.
        scale: ``None`` for D4 only, or the token-area range, e.g. ``(0.7, 1.3)`` (paper). Needs a ViT that
            accepts other input sizes; :func:`ser_plugin.attach_ser` refuses it otherwise.
        ratio: aspect-ratio range of the scale part (paper: 3/4..4/3).
        photometric: ``"mocov3"`` (default), ``None`` (none), or a pair of callables ``(p1, p2)``
            mapping ``(B, C, H, W)`` in ``[0, 1]`` to the same shape.
        mean, std: if given, views are normalised after augmentation (inputs must then be in ``[0, 1]``).

    Shape:
        ``(n, C, H, W) -> ViewPair((n, C, H1, W1), (n, C, H2, W2), g1, g2)``.

    Example:
        >>> views = EquivariantViews(patch_size=4, photometric=None)
        >>> pair = views(torch.rand(8, 3, 32, 32))
        >>> pair.x1.shape
        torch.Size([8, 3, 32, 32])
    """

    def __init__(
        self,
        patch_size: int = 16,
        rotations: bool = True,
        flips: bool = True,
        scale: Optional[Tuple[float, float]] = None,
        ratio: Tuple[float, float] = (3 / 4, 4 / 3),
        photometric: Union[str, None, Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = "mocov3",
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        if not isinstance(patch_size, int) or patch_size < 1:
            raise SERError(f"patch_size must be a positive int, got {patch_size!r}.")
        if scale is not None:
            if len(scale) != 2 or not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scale) or not (0 < scale[0] <= scale[1]):
                raise SERError(f"scale must be an area range (lo, hi) with 0 < lo <= hi, got {scale!r}.")
            if len(ratio) != 2 or not (0 < ratio[0] <= ratio[1]):
                raise SERError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {ratio!r}.")
        self.patch_size = patch_size
        self.rotations = rotations
        self.flips = flips
        self.scale = tuple(scale) if scale is not None else None
        self.ratio = tuple(ratio)
        self._photometric_spec = photometric
        self.p1: Photometric = None
        self.p2: Photometric = None
        if isinstance(photometric, tuple):
            self.p1, self.p2 = photometric
        elif photometric not in (None, "mocov3"):
            raise SERError(f"photometric must be 'mocov3', None or a pair of callables, got {photometric!r}.")
        self._built_for: Optional[int] = None
        if (mean is None) != (std is None):
            raise SERError("give both mean and std for normalisation, or neither.")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) if mean is not None else None, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) if std is not None else None, persistent=False)

    def _photometric(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        if self._photometric_spec == "mocov3":
            side = x.shape[-1]
            if self._built_for != side:
                self.p1, self.p2 = mocov3_photometric(side, False), mocov3_photometric(side, True)
                self._built_for = side
        if self.p1 is None:
            return x, x
        if x.shape[1] == 1 and self._photometric_spec == "mocov3":
            # kornia's colour ops need RGB: run them on a repeated channel and average back
            a, b = self.p1(x.expand(-1, 3, -1, -1)), self.p2(x.expand(-1, 3, -1, -1))
            return a.mean(1, keepdim=True), b.mean(1, keepdim=True)
        return self.p1(x), self.p2(x)

    def _elements(self, n: int, h: int, w: int, device: torch.device, generator: Optional[torch.Generator]) -> Tuple[GroupElement, Tuple[int, int]]:
        g = GroupElement.random(n, self.rotations, self.flips, generator=generator).to(device)
        if h != w and self.rotations:
            raise SERError(
                f"quarter turns of non-square images ({h}x{w}) give views of different shapes; "
                "use square images or EquivariantViews(rotations=False)."
            )
        if self.scale is None:
            return g, (h, w)
        hh, ww = _sample_scale_size(h, w, self.patch_size, self.scale, self.ratio, generator)
        g = GroupElement(g.rot, g.flip, torch.tensor([hh / h, ww / w], dtype=torch.float64, device=device).expand(n, 2).clone())
        return g, (hh, ww)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> ViewPair:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise SERError(f"views expect an image batch (n, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}.")
        n, c, h, w = x.shape
        if n == 0:
            raise SERError("views got an empty batch (n=0); b2 needs at least 2 images for the loss to have negatives.")
        if not x.is_floating_point():
            raise SERError(f"views expect float images in [0, 1], got dtype {x.dtype} (shape {tuple(x.shape)}); convert first, e.g. x.float() / 255.")
        if c == 0 or h == 0 or w == 0:
            raise SERError(f"views got an empty image batch {tuple(x.shape)}; channels, height and width must be positive.")
        if self._photometric_spec == "mocov3" and c not in (1, 3):
            raise SERError(f"photometric='mocov3' needs 1 or 3 channels, got {tuple(x.shape)}; pass photometric=None or your own (p1, p2) pair.")
        if h % self.patch_size or w % self.patch_size:
            raise SERError(f"image size ({h}, {w}) is not a multiple of patch_size={self.patch_size}; resize or crop first.")
        v1, v2 = self._photometric(x)
        g1, s1 = self._elements(n, h, w, x.device, generator)
        g2, s2 = self._elements(n, h, w, x.device, generator)
        x1, x2 = act_image(v1, g1, size=s1), act_image(v2, g2, size=s2)
        if self.mean is not None:
            x1 = (x1 - self.mean) / self.std
            x2 = (x2 - self.mean) / self.std
        return ViewPair(x1, x2, g1, g2)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, rotations={self.rotations}, flips={self.flips}, scale={self.scale}, photometric={self._photometric_spec!r}"


class ViewTransform:
    """Data-loader-side T_eq for one image (C, H, W) in ``[0, 1]``: photometric then D4, on the CPU.

    Returns ``(x1, x2, e1, e2)`` with ``e_i = tensor([rot, flip])``; :func:`collate_views` turns a list of
    these into a :class:`ViewPair`. Scale is a per-batch choice and cannot be drawn per sample in a loader:
    apply it on the device with :func:`rescale_pair` if wanted.
    """

    def __init__(self, rotations: bool = True, flips: bool = True, photometric: Union[str, None, Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = "mocov3") -> None:
        self._views = EquivariantViews(patch_size=1, rotations=rotations, flips=flips, photometric=photometric)

    def __call__(self, image: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if not isinstance(image, Tensor) or image.dim() != 3:
            raise SERError(f"ViewTransform takes one image (C, H, W), got {tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__}.")
        with torch.no_grad():
            p = self._views(image[None])
        return p.x1[0], p.x2[0], torch.stack([p.g1.rot[0], p.g1.flip[0].long()]), torch.stack([p.g2.rot[0], p.g2.flip[0].long()])


def collate_views(items: Sequence[Tuple[Tensor, Tensor, Tensor, Tensor]]) -> ViewPair:
    """Stacks :class:`ViewTransform` outputs into one :class:`ViewPair`."""
    x1 = torch.stack([i[0] for i in items])
    x2 = torch.stack([i[1] for i in items])
    e1 = torch.stack([i[2] for i in items])
    e2 = torch.stack([i[3] for i in items])
    return ViewPair(x1, x2, GroupElement.from_d4(e1[:, 0], e1[:, 1]), GroupElement.from_d4(e2[:, 0], e2[:, 1]))


def rescale_pair(pair: ViewPair, patch_size: int, scale: Tuple[float, float] = (0.7, 1.3), ratio: Tuple[float, float] = (3 / 4, 4 / 3), generator: Optional[torch.Generator] = None) -> ViewPair:
    """Adds one random scale per view to a D4 :class:`ViewPair` (e.g. from a loader), on its device."""
    out = []
    for x, g in ((pair.x1, pair.g1), (pair.x2, pair.g2)):
        h, w = x.shape[-2:]
        hh, ww = _sample_scale_size(h, w, patch_size, scale, ratio, generator)
        s = GroupElement.from_d4(torch.zeros(len(g), dtype=torch.long, device=x.device), torch.zeros(len(g), dtype=torch.bool, device=x.device), (hh / h, ww / w))
        out.append((act_image(x, s, size=(hh, ww)), s.compose(g)))
    return ViewPair(out[0][0], out[1][0], out[0][1], out[1][1])

