"""The equivariant-view policy T_eq: two views per image, photometric then geometric, elements returned.

``x_i = g_i · p_i(x)``: ``p_i`` photometric only (colour jitter, grayscale, blur, solarize; never
geometric), ``g_i`` from G (per-sample D4; one scale per view per batch). No crop between the two views,
so view 2 is ``g · view 1`` up to photometrics, with ``g = g2 ∘ g1⁻¹`` (:attr:`ViewPair.relative`).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import allowed as A
from .errors import SERError
from .group import D4_ELEMENTS, GroupElement, act_image, to_device
from .photometric import BatchedPhotometric

__all__ = ["ViewPair", "EquivariantViews", "ViewTransform", "collate_views", "rescale_pair"]

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
        """The views and elements on ``device`` (elements need not move: the actions move what they need)."""
        return ViewPair(self.x1.to(device, non_blocking=non_blocking), self.x2.to(device, non_blocking=non_blocking), self.g1.to(device), self.g2.to(device))


def _scale_sizes(
    h: int, w: int, patch: int, area: Tuple[float, float], ratio: Tuple[float, float], host: Optional[torch.Generator], views: int
) -> List[Tuple[int, int]]:
    """``views`` output sizes (multiples of ``patch``), drawn in one CPU sampling (one read of a CPU tensor)."""
    u = torch.rand(views, 2, generator=host).tolist()
    out = []
    for ua, ur in u:
        a = area[0] + (area[1] - area[0]) * ua
        r = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * ur)
        out.append((max(1, int(round(h * math.sqrt(a * r) / patch))) * patch, max(1, int(round(w * math.sqrt(a / r) / patch))) * patch))
    return out


def _scale_rows(size: Tuple[int, int], h: int, w: int, n: int, device: torch.device) -> Tensor:
    """``(n, 2)`` float64 ``(sy, sx)`` rows on ``device``, filled there (no host-to-device copy)."""
    out = torch.empty(n, 2, dtype=torch.float64, device=device)
    out[:, 0] = size[0] / h
    out[:, 1] = size[1] / w
    return out


def _host_generator(generator: Optional[torch.Generator]) -> Optional[torch.Generator]:
    """The CPU generator for the host-side draws (scale sizes). A CPU generator is used as is; for a device
    generator, a CPU generator seeded from its state (seed and offset live on the host: no device sync), so
    the same seed gives the same sizes and the device draws that follow move the state on."""
    if generator is None or generator.device.type == "cpu":
        return generator
    state = bytes(generator.get_state().tolist())
    seed = int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little") & ((1 << 63) - 1)
    return torch.Generator().manual_seed(seed)


class _RangeGuard:
    """Checks the images reaching the photometrics without a host sync.

    Two checks: the ``[0, 1]`` images ``u`` the built-in photometrics get are in ``[0, 1]`` (else they would be
    clamped: refused), and, when mean/std were given, that the input ``x`` is not entirely inside ``[0, 1]``: a
    batch with no value below the mean *and* none above ``mean + std`` is ``[0, 1]`` images given where normalised
    ones are expected (refused). A small batch of bright, genuinely normalised images (every pixel above the mean)
    reaches above ``mean + std`` and passes. CPU tensors are checked at once (``torch._assert_async``: a CPU read, free). On CUDA the batch's extremes go to pinned host memory with a
    non-blocking copy and an event; the check runs when the event has completed, at a later call (or
    :meth:`EquivariantViews.check_pending`), and raises there: a bad batch is refused a step late instead of
    stalling every step.
    """

    TOL = 1e-3

    def __init__(self) -> None:
        self.pending: List[Tuple[Any, ...]] = []

    def __getstate__(self) -> dict:
        # copies and pickles (EMA / SWA copies, torch.save) start clean: pending checks hold CUDA events
        return {"pending": []}

    def __setstate__(self, state: dict) -> None:
        self.pending = []

    def __deepcopy__(self, memo: dict) -> _RangeGuard:
        return _RangeGuard()

    def __call__(self, u: Optional[Tensor], x: Optional[Tensor]) -> None:
        """``u``: ``[0, 1]`` images for the built-in photometrics (or None); ``x``: the normalised input (or None)."""
        self.poll()
        ref = u if u is not None else x
        if ref is None or ref.device.type == "meta":
            return
        ext = torch.stack([
            u.detach().amin().float() if u is not None else torch.zeros((), device=ref.device),
            u.detach().amax().float() if u is not None else torch.ones((), device=ref.device),
            x.detach().amin().float() if x is not None else torch.full((), -1.0, device=ref.device),
            x.detach().amax().float() if x is not None else torch.full((), 2.0, device=ref.device),
        ])
        meta = (tuple(ref.shape), x is not None)
        if ref.device.type == "cuda":
            host = torch.empty(4, dtype=torch.float32, pin_memory=True)
            host.copy_(ext, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(ref.device))
            self.pending.append((host, ev, *meta))
            return
        if ref.device.type != "cpu":  # other devices: read now (one sync)
            self._raise_if_bad(ext.cpu(), *meta, late=False)
            return
        ok = (ext[0] >= -self.TOL) & (ext[1] <= 1 + self.TOL) & ((ext[2] < 0) | (ext[3] > 1))
        try:
            torch._assert_async(ok, "views: input out of range")
        except RuntimeError:
            self._raise_if_bad(ext, *meta, late=False)

    def poll(self, wait: bool = False) -> None:
        keep = []
        for host, ev, *meta in self.pending:
            if wait:
                ev.synchronize()
            if wait or ev.query():
                self._raise_if_bad(host, *meta, late=True)
            else:
                keep.append((host, ev, *meta))
        self.pending = keep

    def _raise_if_bad(self, ext: Tensor, shape: Tuple[int, ...], normalised: bool, late: bool) -> None:
        lo, hi, xmin, xmax = ext.tolist()
        when = " (found asynchronously: a batch given to an earlier call)" if late else ""
        if normalised and not (xmin < 0 or xmax > 1):
            self.pending = []
            raise SERError(
                f"views were given mean=/std= and a batch {shape} with no value below the mean and none above mean + std "
                f"(all in [{xmin:.3g}, {xmax:.3g}] after normalisation){when}: "
                "these look like [0, 1] images, but with mean=/std= the input must be normalised, (x - mean) / std of [0, 1] "
                "images (the views de-normalise, augment and normalise again). Normalise the batch first "
                "(ser_plugin.integrations.views_input(x, mean, std) does it for [0, 1] or uint8 crops), or drop mean=/std= "
                "and normalise the views yourself after ser.views."
            )
        if not (lo >= -self.TOL and hi <= 1 + self.TOL):
            self.pending = []
            if normalised:
                raise SERError(
                    f"views got images that, de-normalised with the given mean/std, span [{lo:.3g}, {hi:.3g}], outside "
                    f"[0, 1] (batch {shape}){when}. With mean=/std= the input must be (x - mean) / std of [0, 1] "
                    "images: check the statistics (channel order, std not variance, 0-255 vs 0-1 scale), or pass "
                    "photometric=None to skip the photometrics."
                )
            raise SERError(
                f"views got images with values in [{lo:.3g}, {hi:.3g}], outside [0, 1] (batch {shape}){when}; the "
                "built-in photometrics need [0, 1] images and would clamp them. If your loader normalises (e.g. "
                "ImageNet mean/std), pass mean=/std= (the views then de-normalise, augment and re-normalise); if "
                "these are 0-255 values, divide by 255; or pass photometric=None."
            )


def pair_elements(
    pairing: str, n: int, rotations: bool = True, flips: bool = True, gen: Optional[torch.Generator] = None
) -> Tuple[GroupElement, GroupElement]:
    """Per-sample D4 parts of the two views' elements under a pairing, drawn on the generator's device.

    Args:
        pairing: ``"independent"``, ``"no_identity"`` or ``"authors"`` (see :class:`EquivariantViews`).
        n: batch size.
        rotations, flips: the allowed parts of D4 (``"authors"`` needs both).
        gen: random source (default: the global CPU generator).

    Returns:
        ``(g1, g2)``, ``n`` elements each, on ``gen``'s device (the CPU by default), scale ones.
    """
    dev = gen.device if gen is not None else torch.device("cpu")
    if pairing == "independent":
        return (GroupElement.random(n, rotations, flips, generator=gen),
                GroupElement.random(n, rotations, flips, generator=gen))
    if pairing == "no_identity":
        g1 = GroupElement.random(n, rotations, flips, generator=gen)
        table = [(k, f) for (k, f) in D4_ELEMENTS if (k, f) != (0, 0) and (rotations or k == 0) and (flips or f == 0)]
        t = torch.tensor(table, dtype=torch.long).to(dev, non_blocking=True)  # no blocking host-to-device copy
        pick = t[torch.randint(0, len(table), (n,), generator=gen, device=dev)]
        rel = GroupElement(pick[:, 0], pick[:, 1].bool(), torch.ones(n, 2, dtype=torch.float64, device=dev))
        return g1, rel.compose(g1)
    # authors: complementary 180° turn and flip per sample, one quarter-turn count per view for the batch
    bits = torch.randint(0, 2, (2, n), generator=gen, device=dev)
    turns = torch.randint(0, 4, (2, 1), generator=gen, device=dev)
    ones = torch.ones(n, 2, dtype=torch.float64, device=dev)
    g1 = GroupElement((turns[0] + 2 * bits[0]) % 4, bits[1].bool(), ones)
    g2 = GroupElement((turns[1] + 2 * (1 - bits[0])) % 4, ~bits[1].bool(), ones.clone())
    return g1, g2


def _check_batch(self: EquivariantViews, x: Tensor) -> None:
    """Refuses a batch the policy cannot use (SERError naming the fix)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise SERError(f"views expect an image batch (n, C, H, W), got {tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}.")
    n, c, h, w = x.shape  # n == 0 is allowed: a rank (or step) without b2 images gets empty views and a zero loss
    if not x.is_floating_point():
        raise SERError(f"views expect float images in [0, 1], got dtype {x.dtype} (shape {tuple(x.shape)}); convert first, e.g. x.float() / 255.")
    if c == 0 or h == 0 or w == 0:
        raise SERError(f"views got an empty image batch {tuple(x.shape)}; channels, height and width must be positive.")
    if self.builtin_photometric and c not in (1, 3):
        raise SERError(f"photometric={self._photometric_spec!r} needs 1 or 3 channels, got {tuple(x.shape)}; pass photometric=None or your own (p1, p2) pair.")
    if self.mean is not None and self.mean.shape[1] not in (1, c):
        raise SERError(f"mean/std have {self.mean.shape[1]} entries but the images have {c} channels ({tuple(x.shape)}).")
    if h % self.patch_size or w % self.patch_size:
        raise SERError(f"image size ({h}, {w}) is not a multiple of patch_size={self.patch_size}; resize or crop first.")
    if h != w and self.rotations:
        raise SERError(
            f"quarter turns of non-square images ({h}x{w}) give views of different shapes; "
            "use square images or EquivariantViews(rotations=False)."
        )


class EquivariantViews(nn.Module):
    """Makes two equivariant views of an image batch on its device: ``x_i = g_i · p_i(x)``.

    Args:
        patch_size: the ViT's patch size; scaled views are sized to multiples of it.
        rotations: draw quarter turns (needs square images).
        flips: draw horizontal flips.
        scale: ``None`` for D4 only, or the token-area range, e.g. ``(0.7, 1.3)`` (paper). Needs a ViT that
            accepts other input sizes; :func:`ser_plugin.attach_ser` refuses it otherwise.
        ratio: aspect-ratio range of the scale part (paper: 3/4..4/3).
        photometric: ``"mocov3"`` (default; batched MoCo-v3 recipe), ``"authors"`` (the SER authors' variant:
            additive brightness, blur kernel 9 at 224 px, solarize threshold drawn in U(0, 1)), ``None``, or a
            pair of callables ``(p1, p2)`` mapping ``(B, C, H, W)`` in ``[0, 1]`` to the same shape.
        mean, std: the loader's normalisation. If given, the input is taken as normalised
            (``(x - mean) / std`` of ``[0, 1]`` images): it is de-normalised for the photometrics and the
            views are normalised again, so they come out like the loader's images.
        pairing: how the two views' elements relate. ``"independent"``: ``g1``, ``g2`` uniform and
            independent (the relative element is the identity 1/8 of the time with D4). ``"no_identity"``:
            ``g1`` uniform, the relative element ``g2 ∘ g1⁻¹`` uniform over the non-identity elements.
            ``"authors"``: the released SER code's pairing — per sample a 180° turn and a flip on exactly one
            of the two views (complementary), plus one quarter-turn count per view shared by the batch; the
            relative element is always a reflection.
        image_interpolation: resampler of the scale part on images, ``"bilinear"`` (antialiased) or
            ``"bicubic"`` (no antialias, as the authors' code).

    Shape:
        ``(n, C, H, W) -> ViewPair((n, C, H1, W1), (n, C, H2, W2), g1, g2)``. The elements live on the
        generator's device (the CPU unless a device generator is given), not necessarily the images'.

    Raises:
        SERError: invalid options, or a batch the policy cannot use (see ``forward``).

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
        pairing: str = "independent",
        image_interpolation: str = "bilinear",
    ) -> None:
        super().__init__()
        own = "EquivariantViews"  # the same checks and messages as SERConfig (ser_plugin.allowed)
        rotations, flips = A.check_bool("rotations", rotations, own), A.check_bool("flips", flips, own)
        mean, std = A.check_mean_std(mean, std, own)
        self._setup(A.check_int("patch_size", patch_size, minimum=1, allowed="a positive int", owner=own), rotations, flips,
                    A.check_scale(scale, own), A.check_ratio(ratio, own), A.check_photometric(photometric, own), mean, std,
                    A.check_pairing(pairing, rotations, flips, own), A.check_choice("image_interpolation", image_interpolation, A.IMAGE_INTERPOLATIONS, own))

    @classmethod
    def from_config(cls, config: Any, patch_size: int) -> EquivariantViews:
        """The view policy of a validated :class:`~ser_plugin.SERConfig` (its values are not checked again)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        c = config
        self._setup(int(patch_size), c.rotations, c.flips, c.scale, c.ratio, c.photometric, c.mean, c.std, c.pairing, c.image_interpolation)
        return self

    def _setup(self, patch_size: int, rotations: bool, flips: bool, scale: Optional[Tuple[float, float]], ratio: Tuple[float, float],
               photometric: Any, mean: Optional[Tuple[float, ...]], std: Optional[Tuple[float, ...]], pairing: str, image_interpolation: str) -> None:
        self.patch_size = patch_size
        self.rotations = rotations
        self.flips = flips
        self.scale = scale
        self.ratio = ratio
        self.pairing = pairing
        self.image_interpolation = image_interpolation
        self._photometric_spec = photometric
        self.p1: Photometric = None
        self.p2: Photometric = None
        if isinstance(photometric, tuple):
            self.p1, self.p2 = photometric
        elif photometric is not None:
            self.p1, self.p2 = BatchedPhotometric._validated(photometric, False), BatchedPhotometric._validated(photometric, True)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) if mean is not None else None, persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) if std is not None else None, persistent=False)
        self._guard = _RangeGuard()

    @property
    def builtin_photometric(self) -> bool:
        return isinstance(self._photometric_spec, str)

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> ViewPair:
        """Two views of ``x`` and their elements.

        Args:
            x: ``(n, C, H, W)`` float images in ``[0, 1]`` (or normalised, if ``mean``/``std`` were given).
            generator: the random source of everything drawn (elements, scale sizes, photometric parameters):
                the same seed gives the same views. A CPU generator (recommended) or ``None`` (the global CPU
                RNG) draws on the CPU and moves only small index/parameter tensors to the images' device,
                non-blocking; a CUDA generator draws on its device (the scale sizes then come from a CPU
                generator seeded from its state). Custom ``(p1, p2)`` photometrics are called without it.

        Returns:
            A :class:`ViewPair`.

        Raises:
            SERError: not a float image batch, images with no pixels, not patch-aligned, non-square with rotations,
                wrong channel count for the built-in photometrics, or values outside ``[0, 1]`` reaching them
                (on CUDA reported at a later call, without a per-step sync). A batch of no images (a rank
                without b2 images this step) gives empty views; the loss on them is an exact zero.
        """
        _check_batch(self, x)
        n, c, h, w = x.shape
        mean = std = None
        if self.mean is not None:
            mean = to_device(self.mean, x.device).to(x.dtype)
            std = to_device(self.std, x.device).to(x.dtype)
        u = x if mean is None else x * std + mean  # normalised input -> [0, 1] images for the photometrics
        if n:  # an empty batch (a rank without b2 images) has no range to check
            self._guard(u if self.builtin_photometric else None, x if mean is not None else None)
        if self.p1 is None:
            v1 = v2 = u
        elif self.builtin_photometric:
            v1, v2 = self.p1(u, generator=generator), self.p2(u, generator=generator)
        else:
            v1, v2 = self.p1(u), self.p2(u)
        g1, g2 = pair_elements(self.pairing, n, self.rotations, self.flips, generator)
        s1 = s2 = (h, w)
        if self.scale is not None:
            s1, s2 = _scale_sizes(h, w, self.patch_size, self.scale, self.ratio, _host_generator(generator), 2)
            g1 = GroupElement(g1.rot, g1.flip, _scale_rows(s1, h, w, n, g1.device))
            g2 = GroupElement(g2.rot, g2.flip, _scale_rows(s2, h, w, n, g2.device))
        mode = self.image_interpolation
        antialias = mode == "bilinear"
        parity = None if self.rotations else False
        x1 = act_image(v1, g1, size=s1, mode=mode, antialias=antialias, parity=parity)
        x2 = act_image(v2, g2, size=s2, mode=mode, antialias=antialias, parity=parity)
        if mean is not None:
            x1, x2 = (x1 - mean) / std, (x2 - mean) / std
        return ViewPair(x1, x2, g1, g2)

    def check_pending(self) -> None:
        """Waits for the asynchronous input-range checks of earlier calls (CUDA) and raises if one failed."""
        self._guard.poll(wait=True)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, rotations={self.rotations}, flips={self.flips}, scale={self.scale}, "
            f"photometric={self._photometric_spec!r}, pairing={self.pairing!r}, image_interpolation={self.image_interpolation!r}"
        )


class ViewTransform:
    """Data-loader-side T_eq for one image (C, H, W) in ``[0, 1]``: photometric then D4, on the CPU.

    Returns ``(x1, x2, e1, e2)`` with ``e_i = tensor([rot, flip])``; :func:`collate_views` turns a list of
    these into a :class:`ViewPair`. Scale is a per-batch choice and cannot be drawn per sample in a loader:
    apply it on the device with :func:`rescale_pair` if wanted.
    """

    def __init__(
        self,
        rotations: bool = True,
        flips: bool = True,
        photometric: Union[str, None, Tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]] = "mocov3",
        pairing: str = "independent",
    ) -> None:
        """Args: as :class:`EquivariantViews`; ``pairing`` ``"independent"`` or ``"no_identity"`` (``"authors"``
        shares quarter turns across a batch, which one image in a loader cannot: use :class:`EquivariantViews`).

        Raises:
            SERError: ``pairing="authors"`` or an invalid option.
        """
        if pairing == "authors":
            raise SERError("ViewTransform draws one image at a time; pairing='authors' shares quarter turns across the batch: make the views on the device with EquivariantViews(pairing='authors').")
        self._views = EquivariantViews(patch_size=1, rotations=rotations, flips=flips, photometric=photometric, pairing=pairing)

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


def rescale_pair(pair: ViewPair, patch_size: int, scale: Tuple[float, float] = (0.7, 1.3), ratio: Tuple[float, float] = (3 / 4, 4 / 3), generator: Optional[torch.Generator] = None, mode: str = "bilinear") -> ViewPair:
    """Adds one random scale per view to a D4 :class:`ViewPair` (e.g. from a loader), on its device.

    Args:
        pair: views of one size ``(n, C, H, W)`` with their elements.
        patch_size: the new sizes are multiples of it.
        scale: token-area range.
        ratio: aspect-ratio range.
        generator: CPU generator for the sizes (one CPU read; no device sync).
        mode: ``"bilinear"`` (antialiased) or ``"bicubic"`` (no antialias).

    Returns:
        The rescaled :class:`ViewPair`; its elements include the scales.
    """
    mode = A.check_choice("mode", mode, A.IMAGE_INTERPOLATIONS, "rescale_pair")
    h, w = pair.x1.shape[-2:]
    if tuple(pair.x2.shape[-2:]) != (h, w):
        raise SERError(f"rescale_pair needs two views of one size, got {tuple(pair.x1.shape)} and {tuple(pair.x2.shape)}.")
    sizes = _scale_sizes(h, w, patch_size, scale, ratio, _host_generator(generator), 2)
    out = []
    for (x, g), (hh, ww) in zip(((pair.x1, pair.g1), (pair.x2, pair.g2)), sizes):
        zeros = torch.zeros(len(g), dtype=torch.long, device=g.device)
        s = GroupElement(zeros, zeros.bool(), _scale_rows((hh, ww), h, w, len(g), g.device))
        out.append((act_image(x, GroupElement(zeros, zeros.bool(), torch.ones_like(s.scale)), size=(hh, ww), mode=mode, antialias=mode == "bilinear"), s.compose(g)))
    return ViewPair(out[0][0], out[1][0], out[0][1], out[1][1])
