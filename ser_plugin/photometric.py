"""Batched, sync-free photometric augmentations for the equivariant views (no geometric part).

kornia's augmentation modules gate samples with Python reads of the per-sample draws (about ten host reads
per batch on a GPU). :class:`BatchedPhotometric` draws every parameter of a batch in one sampling with the
caller's generator, computes each step for the whole batch with kornia's functional ops (which take
per-sample tensor parameters) and keeps it per sample with ``torch.where``: no host read, no boolean-mask
indexing, no data-dependent Python branch. Steps that only some samples get (blur at p=0.1, solarize) are
computed for the whole batch and selected, which costs compute but never a stall.

Two variants:

``"mocov3"`` (MoCo-v3's asymmetric recipe, torchvision semantics as in kornia's ``ColorJitter``)
    colour jitter (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1; p=0.8; brightness multiplies,
    contrast blends with the grayscale mean, saturation with the grayscale) in a random order per image
    (see :meth:`BatchedPhotometric.sample`); grayscale p=0.2; Gaussian blur sigma ~ U(0.1, 2) with a kernel of about 10% of the image side
    (23 px at 224), p=1.0 on view 1 and 0.1 on view 2; solarize at 0.5, p=0.2, on view 2 only.
``"authors"`` (the SER authors' released variant, kornia ``ColorJiggle`` semantics)
    the same strengths and probabilities, but brightness is additive (``x + f - 1``), contrast multiplies
    the raw values and saturation scales the HSV saturation;
    blur kernel 9 px at 224 px, scaled with the image side; solarize (view 2, p=0.2) at a threshold drawn
    per sample from U(0, 1) (kornia's ``RandomSolarize(thresholds=0.5)``: values at or above the threshold
    are inverted, ``x -> 1 - x``).

Inputs are ``(B, 3, H, W)`` or ``(B, 1, H, W)`` in ``[0, 1]`` (one channel is processed as gray RGB and
averaged back); outputs have the input's shape, in ``[0, 1]``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from . import allowed as A
from .errors import SERError
from .group import to_device

__all__ = ["BatchedPhotometric", "blur_kernel_size"]

_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0.4, 0.4, 0.2, 0.1
_P_JITTER, _P_GRAY, _P_SOLARIZE = 0.8, 0.2, 0.2
_SIGMA = (0.1, 2.0)


def blur_kernel_size(variant: str, image_size: int) -> int:
    """The odd Gaussian-blur kernel side for an image side: MoCo-v3 about 10% (23 at 224), authors 9 at 224.

    Args:
        variant: ``"mocov3"`` or ``"authors"``.
        image_size: the image side in pixels.

    Returns:
        An odd kernel size, at least 3.
    """
    frac = 0.1 if variant == "mocov3" else 9.0 / 224.0
    return max(3, int(round(frac * image_size)) | 1)


def _nb(t: Tensor, like: Tensor) -> Tensor:
    """``t`` on ``like``'s device and dtype; a host-to-device copy is non-blocking (no stream sync)."""
    t = to_device(t, like.device)
    return t.to(like.dtype) if t.is_floating_point() and t.dtype != like.dtype else t


def _sel(flag: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Per sample: ``a`` where ``flag`` (B,) else ``b``."""
    return torch.where(flag.view(-1, 1, 1, 1), a, b)


class BatchedPhotometric(nn.Module):
    """One view's photometric augmentation, batched and free of host syncs.

    Args:
        variant: ``"mocov3"`` or ``"authors"`` (see the module docstring).
        second: the second view's recipe (blur p=0.1 and solarize p=0.2 instead of blur p=1.0).
        kernel_size: blur kernel side; default from the image side at each call
            (:func:`blur_kernel_size`).

    Shape:
        ``(B, C, H, W) -> (B, C, H, W)`` with ``C`` in ``{1, 3}``, values in ``[0, 1]``.

    Raises:
        SERError: unknown variant, or a channel count other than 1 or 3.

    Example:
        >>> p = BatchedPhotometric("mocov3", second=True)
        >>> p(torch.rand(4, 3, 32, 32), generator=torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 32, 32])
    """

    def __init__(self, variant: str = "mocov3", second: bool = False, kernel_size: Optional[int] = None) -> None:
        super().__init__()
        variant = A.check_choice("variant", variant, A.PHOTOMETRIC_VARIANTS, "BatchedPhotometric")
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise SERError(f"kernel_size must be a positive odd int, got {kernel_size!r}.")
        self._setup(variant, second, kernel_size)

    @classmethod
    def _validated(cls, variant: str, second: bool) -> BatchedPhotometric:
        """For the view policy, whose variant was validated with its config: not checked again."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(variant, second, None)
        return self

    def _setup(self, variant: str, second: bool, kernel_size: Optional[int]) -> None:
        self.variant = variant
        self.second = second
        self.kernel_size = kernel_size
        self.p_blur = 0.1 if second else 1.0
        self.p_solarize = _P_SOLARIZE if second else 0.0

    # ------------------------------------------------------------------ sampling
    def sample(self, n: int, generator: Optional[torch.Generator] = None, device: Optional[torch.device] = None) -> Dict[str, Tensor]:
        """All parameters of a batch in one draw on the generator's device (default: CPU).

        The batch is laid out in ``m = 4·ceil(n/4)`` slots (a random injection ``slot[j]`` of the ``n`` images;
        unused slots hold a copy of image 0 and are dropped). Slot ``i`` applies the hue step at jitter stage
        ``i // (m/4)``, so the expensive hue step runs once per image on static slices, while each image's
        position — uniform slot — gets a hue stage uniform over the four, and a uniform random order of the
        other three steps: per image, the order is uniform over the 24 permutations, as in torchvision and
        kornia (which share one order across a batch).

        Args:
            n: batch size.
            generator: the random source; its device is where the parameters are drawn.
            device: where to draw when ``generator`` is None (default CPU, the global generator).

        Returns:
            Per slot (``m`` rows): ``jitter`` bool, ``factors`` (m, 4) brightness/contrast/saturation/hue,
            ``order`` (m, 4) a permutation of 0..3, ``gray``/``blur``/``solarize`` bool, ``sigma``,
            ``threshold``; and ``slot`` (n,), the slot of each image.
        """
        dev = generator.device if generator is not None else (device or torch.device("cpu"))
        q = -(-n // 4)
        m = 4 * q
        u = torch.rand(m, 13, generator=generator, device=dev, dtype=torch.float32)
        slot = torch.randperm(m, generator=generator, device=dev)[:n]
        lo = (1 - _BRIGHTNESS, 1 - _CONTRAST, 1 - _SATURATION, -_HUE)
        hi = (1 + _BRIGHTNESS, 1 + _CONTRAST, 1 + _SATURATION, _HUE)
        hue_at = torch.arange(m, device=dev) // q  # (m,) stage of the hue step, static per slot
        rest = u[:, 1:4].argsort(dim=1)  # (m, 3) random order of brightness, contrast, saturation
        stage = torch.arange(4, device=dev).view(1, 4)
        k = (stage - (stage > hue_at[:, None]).long()).clamp(0, 2)
        order = torch.where(stage == hue_at[:, None], 3, rest.gather(1, k))
        return {
            "slot": slot,
            "jitter": u[:, 0] < _P_JITTER,
            "order": order,
            "factors": torch.stack([lo[i] + (hi[i] - lo[i]) * u[:, 4 + i] for i in range(4)], 1),
            "gray": u[:, 8] < _P_GRAY,
            "blur": u[:, 9] < self.p_blur,
            "sigma": _SIGMA[0] + (_SIGMA[1] - _SIGMA[0]) * u[:, 10],
            "solarize": u[:, 11] < self.p_solarize,
            "threshold": u[:, 12] if self.variant == "authors" else torch.full_like(u[:, 12], 0.5),
        }

    # ------------------------------------------------------------------ the steps (kornia functional ops)
    def _step(self, k: int, x: Tensor, f: Tensor) -> Tensor:
        import kornia.enhance as E

        if self.variant == "mocov3":  # torchvision formulas (kornia ColorJitter)
            if k == 0:
                return E.adjust_brightness_accumulative(x, f)
            if k == 1:
                return E.adjust_contrast_with_mean_subtraction(x, f)
            if k == 2:
                return E.adjust_saturation_with_gray_subtraction(x, f)
            return E.adjust_hue(x, f * (2 * math.pi)).clamp(0.0, 1.0)
        # kornia ColorJiggle formulas
        if k == 0:
            return E.adjust_brightness(x, f - 1)
        if k == 1:  # adjust_contrast's formula (x * f, clipped), without its per-call value assert
            return (x * f.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
        if k == 2:
            return E.adjust_saturation(x, f).clamp(0.0, 1.0)
        return E.adjust_hue(x, f * (2 * math.pi)).clamp(0.0, 1.0)

    def apply(self, x: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """Applies drawn parameters (:meth:`sample`) to ``x`` (B, 3, H, W) in ``[0, 1]``, per image."""
        from kornia.color import rgb_to_grayscale
        from kornia.enhance import solarize
        from kornia.filters import filter2d_separable, get_gaussian_kernel1d

        p = {k: _nb(v, x) for k, v in params.items()}
        n = x.shape[0]
        m = p["order"].shape[0]
        q = m // 4
        # image j sits in slot p["slot"][j]; empty slots hold image 0
        src = torch.zeros(m, dtype=torch.long, device=x.device).scatter(0, p["slot"], torch.arange(n, device=x.device))
        x = x.clamp(0.0, 1.0).index_select(0, src)
        f = p["factors"]
        # colour jitter: at stage s, slot i applies step order[i, s]; the hue step only on the slots of stage s
        y = x
        for s in range(4):
            step = p["order"][:, s]
            out = y
            for k in range(3):
                if k == 2 and self.variant == "authors":  # HSV saturation at factor 1 is identity only to ~1e-8
                    out = _sel(step == k, self._step(k, out, f[:, k]), out)
                else:  # the neutral factor (1) is an exact identity on [0, 1] images: no per-image select
                    out = self._step(k, out, torch.where(step == k, f[:, k], torch.ones_like(f[:, k])))
            a, b = s * q, (s + 1) * q
            out = torch.cat([out[:a], self._step(3, y[a:b], f[a:b, 3]), out[b:]])
            y = out
        x = _sel(p["jitter"], y, x)
        x = _sel(p["gray"], rgb_to_grayscale(x).expand_as(x), x)
        ks = self.kernel_size or blur_kernel_size(self.variant, min(x.shape[-2:]))
        kern = get_gaussian_kernel1d(ks, p["sigma"].view(-1, 1))
        x = _sel(p["blur"], filter2d_separable(x, kern, kern, "reflect"), x)
        if self.p_solarize > 0:
            x = _sel(p["solarize"], solarize(x, p["threshold"]), x)
        return x.index_select(0, p["slot"])

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, params: Optional[Dict[str, Tensor]] = None) -> Tensor:
        """Augments a batch ``(B, C, H, W)`` in ``[0, 1]``, ``C`` in ``{1, 3}``.

        Args:
            x: the images.
            generator: random source (CPU or the images' device); parameters are drawn on its device.
            params: parameters from :meth:`sample` to replay instead of drawing.

        Returns:
            The augmented images, same shape.
        """
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise SERError(f"photometric={self.variant!r} needs (B, 1 or 3, H, W) images, got {tuple(x.shape)}; pass photometric=None or your own (p1, p2) pair.")
        if params is None:
            params = self.sample(x.shape[0], generator)
        # one image on the CPU (a data-loader worker): reading its parameters is free, so apply only the steps it
        # gets instead of the batched selects over padded slots (same draws, same result)
        fn = self._apply_one if x.shape[0] == 1 and x.device.type == "cpu" and params["slot"].device.type == "cpu" else self.apply
        if x.shape[1] == 1:
            return fn(x.expand(-1, 3, -1, -1), params).mean(1, keepdim=True)
        return fn(x, params)

    def _apply_one(self, x: Tensor, params: Dict[str, Tensor]) -> Tensor:
        """:meth:`apply` for one CPU image, reading its parameters on the host (no device involved)."""
        from kornia.color import rgb_to_grayscale
        from kornia.enhance import solarize
        from kornia.filters import filter2d_separable, get_gaussian_kernel1d

        i = int(params["slot"][0])
        p = {k: v[i : i + 1] for k, v in params.items() if k != "slot"}
        x = x.clamp(0.0, 1.0)
        if bool(p["jitter"]):
            for k in p["order"][0].tolist():
                x = self._step(k, x, p["factors"][:, k].to(x.dtype))
        if bool(p["gray"]):
            x = rgb_to_grayscale(x).expand_as(x)
        if bool(p["blur"]):
            ks = self.kernel_size or blur_kernel_size(self.variant, min(x.shape[-2:]))
            kern = get_gaussian_kernel1d(ks, p["sigma"].view(-1, 1).to(x.dtype))
            x = filter2d_separable(x, kern, kern, "reflect")
        if self.p_solarize > 0 and bool(p["solarize"]):
            x = solarize(x, p["threshold"].to(x.dtype))
        return x

    def extra_repr(self) -> str:
        return f"variant={self.variant!r}, second={self.second}, kernel_size={self.kernel_size}"
