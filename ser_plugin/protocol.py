"""The measurement protocol: how equivariant is each block, under each group element, against controls.

For every block ``k`` and every group element ``g`` (the three quarter turns, the four reflections, and the
scales 0.75 and 1.25) the protocol compares the predicted map ``ρ_g(F_k(x))`` with the measured map
``F_k(g·x)`` (patch tokens only: prefix tokens such as [CLS] and registers are excluded) and reports

* ``1 − cos``: one minus the cosine similarity of the two token vectors at each grid cell, averaged over
  cells and images (0 = exact equivariance; about 1 = unrelated maps);
* ``1 − cos (centred)``: the same after subtracting each map's mean token (per image and channel), which
  removes the floor that a shared mean component gives the raw figure;
* relative L2: ``‖ρ_g(F_k(x)) − F_k(g·x)‖ / ‖F_k(g·x)‖`` per image (Frobenius norms), averaged over images;

plus the invariance of the final embedding (``1 − cos`` between ``model(x)`` and ``model(g·x)``, both centred on the
mean clean embedding of the batch so that a shared component does not hide differences) when the model has a
[CLS] token, and three controls that make the numbers meaningful:

* ``identity``: ``g = e`` through the same code path; must be ≈ 0 (tests the plumbing, eval mode, hooks);
* ``permutation``: ρ replaced by a fixed random permutation of the token grid, averaged over the D4
  elements: the error of a ρ that ignores the geometry — the "no equivariance" level the real ρ is judged against;
* ``untrained``: the same architecture freshly initialised (:func:`untrained_copy`), measured the same way.

A rotation-only summary (:meth:`ProtocolResult.rotation_summary`: mean cosine similarity over the three quarter
turns per block, 1 = exact) is the figure comparable to the paper's "rotation equivariance" column.

Scale elements act on the image by resampling it to ``(round(h·s)·p, round(w·s)·p)`` pixels (``p`` the patch size,
so the grid stays patch-aligned; the effective factor ``round(h·s)/h`` is reported) and on the token map by
resampling it to ``(round(h·s), round(w·s))`` cells; both resamplers are named in the result. Scale needs a model
that accepts another input size (e.g. timm with ``dynamic_img_size=True``); pass ``scales=()`` otherwise.

Example:
    >>> from ser_plugin.protocol import measure_equivariance
    >>> res = measure_equivariance(vit, images)          # images normalised as the model expects
    >>> res.table()                                     # markdown, per block x element
    >>> res.plot("equivariance.png")                    # needs matplotlib
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .capture import InputInfo, tokens_to_map
from .errors import SERError
from .group import GroupElement, act_image, rho
from .tap import LayerTap
from .vit import declared_prefix_tokens, detect_patch_size, find_blocks, resolve_layer

__all__ = ["ELEMENTS", "ProtocolResult", "measure_equivariance", "untrained_copy", "map_errors"]

#: The group elements of the protocol: name -> (quarter turns, flip, scale). Reflections are flip∘rot^k (k = 0..3).
ELEMENTS: Dict[str, Tuple[int, int, float]] = {
    "rot90": (1, 0, 1.0),
    "rot180": (2, 0, 1.0),
    "rot270": (3, 0, 1.0),
    "flip": (0, 1, 1.0),
    "flip_rot90": (1, 1, 1.0),
    "flip_rot180": (2, 1, 1.0),
    "flip_rot270": (3, 1, 1.0),
}
ROTATIONS = ("rot90", "rot180", "rot270")
REFLECTIONS = ("flip", "flip_rot90", "flip_rot180", "flip_rot270")
METRICS = ("one_minus_cos", "one_minus_cos_centred", "rel_l2")


def map_errors(pred: Tensor, target: Tensor) -> Dict[str, float]:
    """Errors between a predicted and a measured token map.

    Args:
        pred: ``(B, C, h, w)`` ρ_g(F(x)).
        target: ``(B, C, h, w)`` F(g·x), same shape.

    Returns:
        ``{"one_minus_cos", "one_minus_cos_centred", "rel_l2"}`` as floats (means over cells and images).

    Raises:
        SERError: the shapes differ or are not 4-d.
    """
    if pred.dim() != 4 or pred.shape != target.shape:
        raise SERError(f"map_errors needs two (B, C, h, w) maps of the same shape, got {tuple(pred.shape)} and {tuple(target.shape)}.")
    pred, target = pred.double(), target.double()
    cos = F.cosine_similarity(pred, target, dim=1, eps=1e-12)
    pc = pred - pred.mean(dim=(2, 3), keepdim=True)
    tc = target - target.mean(dim=(2, 3), keepdim=True)
    cosc = F.cosine_similarity(pc, tc, dim=1, eps=1e-12)
    num = (pred - target).flatten(1).norm(dim=1)
    den = target.flatten(1).norm(dim=1).clamp_min(1e-12)
    return {"one_minus_cos": float(1 - cos.mean()), "one_minus_cos_centred": float(1 - cosc.mean()), "rel_l2": float((num / den).mean())}


@dataclass
class ProtocolResult:
    """Per-block, per-element equivariance errors with controls.

    Attributes:
        blocks: the block numbers ``1..depth`` measured.
        errors: ``{element: {metric: [value per block]}}``; metrics are :data:`METRICS`.
        controls: ``{"identity" | "permutation" | "untrained": {metric: [value per block]}}`` (the untrained
            control: mean over the D4 elements of a freshly initialised copy; the permutation control: mean over
            the D4 elements with ρ replaced by a random token permutation).
        cls_invariance: ``{element: 1 − cos}`` of the final embedding, or None when the model has no [CLS].
        resampler: how scale acts: ``{"image": ..., "tokens": ...}``.
        effective_scale: ``{element: the factor the patch-aligned grid actually realises}``.
        images: how many images were measured.
        map_norm: mean token norm of ``F_k(x)`` per block (vacuity guard: a model whose maps are all zero would
            score a perfect 0 error).
        input_change: ``‖g·x − x‖ / ‖x‖`` per D4 element (vacuity guard: an element that leaves the images
            unchanged tests nothing; 0 means the images are symmetric under it).
    """

    blocks: List[int]
    errors: Dict[str, Dict[str, List[float]]]
    controls: Dict[str, Dict[str, List[float]]] = field(default_factory=dict)
    cls_invariance: Optional[Dict[str, float]] = None
    resampler: Dict[str, str] = field(default_factory=dict)
    effective_scale: Dict[str, float] = field(default_factory=dict)
    images: int = 0
    map_norm: List[float] = field(default_factory=list)
    input_change: Dict[str, float] = field(default_factory=dict)

    def rotation_summary(self) -> Dict[int, float]:
        """Mean cosine similarity (1 − mean of ``one_minus_cos``) over the three quarter turns, per block
        (1 = exactly rotation-equivariant): the figure comparable to the paper's "rotation equivariance"."""
        return {b: 1.0 - sum(self.errors[r]["one_minus_cos"][i] for r in ROTATIONS) / len(ROTATIONS) for i, b in enumerate(self.blocks)}

    def score(self) -> Dict[int, Dict[str, float]]:
        """Mean cosine similarity over the seven non-identity D4 elements per block, ``{block: {"raw", "centred"}}``
        (1 = exactly equivariant): ``1 −`` the mean of ``one_minus_cos`` and of ``one_minus_cos_centred``."""
        d4 = [e for e in ELEMENTS if e in self.errors]
        raw, centred = self.mean_over(d4, "one_minus_cos"), self.mean_over(d4, "one_minus_cos_centred")
        return {b: {"raw": 1.0 - raw[i], "centred": 1.0 - centred[i]} for i, b in enumerate(self.blocks)}

    def mean_over(self, names: Sequence[str], metric: str = "one_minus_cos") -> List[float]:
        """``metric`` averaged over the elements ``names``, per block."""
        return [sum(self.errors[n][metric][i] for n in names) / len(names) for i in range(len(self.blocks))]

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dictionary (blocks as given, rotation summary included)."""
        return {"blocks": self.blocks, "errors": self.errors, "controls": self.controls, "cls_invariance": self.cls_invariance,
                "resampler": self.resampler, "effective_scale": self.effective_scale, "images": self.images,
                "map_norm": self.map_norm, "input_change": self.input_change,
                "rotation_summary": {str(k): v for k, v in self.rotation_summary().items()}}

    def table(self, metric: str = "one_minus_cos") -> str:
        """Markdown table: one row per element and control, one column per block, ``metric`` values."""
        if metric not in METRICS:
            raise SERError(f"metric must be one of {METRICS}, got {metric!r}.")
        head = "| element | " + " | ".join(f"block {b}" for b in self.blocks) + " |"
        lines = [head, "|---|" + "---|" * len(self.blocks)]
        for name, per in list(self.errors.items()) + [(f"control: {k}", v) for k, v in self.controls.items()]:
            lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in per[metric]) + " |")
        return "\n".join(lines)

    def plot(self, path: Optional[str] = None, metric: str = "one_minus_cos_centred", ax: Any = None, title: str = "") -> Any:
        """Error per block, one line per element (rotations solid, reflections dashed, scales dotted) and the
        controls in grey. Uses matplotlib's object API (no pyplot state, no backend switch).

        Args:
            path: save the figure there (PNG by extension) when given.
            metric: one of :data:`METRICS`.
            ax: draw into this Axes instead of a new figure.
            title: the axes title.

        Returns:
            The matplotlib Figure.
        """
        if metric not in METRICS:
            raise SERError(f"metric must be one of {METRICS}, got {metric!r}.")
        from matplotlib.figure import Figure

        fig = ax.figure if ax is not None else Figure(figsize=(6.4, 4.2))
        ax = ax if ax is not None else fig.add_subplot(1, 1, 1)
        for i, (name, per) in enumerate(self.errors.items()):
            style = "-" if name in ROTATIONS else ("--" if name in REFLECTIONS else ":")
            ax.plot(self.blocks, per[metric], style, marker="o", color=f"C{i % 10}", label=name)
        for j, (name, per) in enumerate(self.controls.items()):
            ax.plot(self.blocks, per[metric], "-.", marker="x", color=str(0.3 + 0.2 * j), label=f"control: {name}")
        ax.set_xlabel("block")
        ax.set_ylabel(metric.replace("_", " "))
        ax.set_xticks(self.blocks)
        ax.set_title(title or f"equivariance error per block ({self.resampler.get('tokens', '')} ρ for scale)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
        if path is not None:
            fig.tight_layout()
            fig.savefig(path, dpi=110)
        return fig


def untrained_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A freshly initialised copy of ``model`` (the "untrained ViT" control): every submodule with
    ``reset_parameters`` is reset and the free parameters (e.g. [CLS], positional embedding) are redrawn
    from N(0, 0.02²), under ``torch.manual_seed(seed)`` (the global RNG state is restored afterwards).

    Returns:
        The copy (the argument is not modified).
    """
    twin = copy.deepcopy(model)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        covered = set()
        for m in twin.modules():
            if hasattr(m, "reset_parameters") and callable(m.reset_parameters):
                m.reset_parameters()
                covered.update(id(p) for p in m.parameters(recurse=False))
        with torch.no_grad():
            for p in twin.parameters():
                if id(p) not in covered:
                    p.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(state)
    return twin


def _element(name: str, spec: Tuple[int, int, float], n: int, device: torch.device) -> GroupElement:
    k, f, _ = spec
    return GroupElement.from_d4([k] * n, [f] * n, device=device)


@torch.no_grad()
def measure_equivariance(
    model: nn.Module,
    x: Tensor,
    *,
    scales: Sequence[float] = (0.75, 1.25),
    image_mode: str = "bilinear",
    token_mode: str = "bilinear",
    controls: Union[bool, Sequence[str]] = True,
    untrained: Optional[nn.Module] = None,
    blocks: Union[None, str, Sequence[nn.Module]] = None,
    patch_size: Optional[int] = None,
    forward: Optional[Callable[[nn.Module, Tensor], Any]] = None,
    perm_seed: int = 0,
    layers: Union[None, int, Sequence[int]] = None,
) -> ProtocolResult:
    """Runs the protocol on ``model`` with images ``x``.

    Args:
        model: the ViT (any model :func:`ser_plugin.capture.find_blocks` understands); run in eval mode under
            no_grad, restored afterwards.
        x: ``(B, C, H, H)`` square, patch-aligned images, normalised as the model expects.
        scales: scale factors to measure besides D4 (``()`` for models that take one input size only).
        image_mode: resampler of the image under scale (antialiased when shrinking).
        token_mode: resampler of ρ on the token map under scale.
        controls: True for all of ``("identity", "permutation", "untrained")``, False for none, or a subset.
        untrained: the model for the untrained control (default: :func:`untrained_copy` of ``model``).
        blocks, patch_size: as in :func:`ser_plugin.attach_ser`, when detection fails.
        forward: ``forward(model, images)`` when ``model(images)`` is not how the model is called.
        perm_seed: seed of the permutation control.
        layers: the blocks to measure (``1..depth``, negative counts from the end; one or several); ``None``: all.

    Returns:
        :class:`ProtocolResult`.

    Raises:
        SERError: bad images, undetectable patch size, or a model that rejects the scaled input size.
    """
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise SERError(f"measure_equivariance needs square images (B, C, H, H) so quarter turns keep the shape, got "
                       f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}.")
    blist = find_blocks(model, blocks)
    psz = (patch_size, patch_size) if patch_size is not None else detect_patch_size(model)
    if psz is None:
        raise SERError("the patch size could not be detected; pass patch_size=.")
    if x.shape[-1] % psz[0]:
        raise SERError(f"images of {x.shape[-1]} px are not a multiple of the patch size {psz[0]}; crop or resize them first.")
    wanted = ("identity", "permutation", "untrained") if controls is True else (() if controls is False else tuple(controls))
    bad = [c for c in wanted if c not in ("identity", "permutation", "untrained")]
    if bad:
        raise SERError(f"unknown control(s) {bad}; choose from identity, permutation, untrained.")
    depth = len(blist)
    wanted_layers = list(range(1, depth + 1)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    measured = sorted({resolve_layer(L, depth) + 1 for L in wanted_layers})
    grid = x.shape[-1] // psz[0]
    n, dev = x.shape[0], x.device
    has_cls = bool(declared_prefix_tokens(model))

    def measure(net: nn.Module, nets_blocks: List[nn.Module]) -> Tuple[Callable[[Tensor], Tuple[Dict[int, Tensor], Any]], Callable[[], None]]:
        order = measured
        current: List[Tuple[int, int]] = [tuple(x.shape[-2:])]  # type: ignore[list-item]

        def to_map(tokens: Tensor, info: Optional[InputInfo], layer: int) -> Tensor:
            hw = info.hw if info is not None else current[0]
            return tokens_to_map(tokens, hw, psz, None, layer)[0].float()

        # the same tap as SER's capture (one hook type); SER handles on this model record nothing meanwhile
        tap = LayerTap(net, dict(zip(order, nets_blocks)), to_map, fingerprints=False)
        run = (lambda t: forward(net, t)) if forward is not None else net

        def maps(inp: Tensor) -> Tuple[Dict[int, Tensor], Any]:
            current[0] = tuple(inp.shape[-2:])  # type: ignore[assignment]
            sink, out = tap.collect(net, lambda: run(inp))
            if len(sink) != len(order):
                raise SERError(f"the forward pass ran {len(sink)} of the {len(order)} measured blocks; pass forward= if the model needs a custom call.")
            return dict(zip(order, sink)), out

        return maps, tap.remove

    def embedding(out: Any) -> Optional[Tensor]:
        return out.float().flatten(1) if isinstance(out, Tensor) and out.dim() == 2 else None

    specs: Dict[str, Tuple[int, int, float]] = dict(ELEMENTS)
    for s in scales:
        if not (isinstance(s, (int, float)) and s > 0 and math.isfinite(s)):
            raise SERError(f"scales must be positive numbers, got {s!r}.")
        specs[f"scale{s:g}"] = (0, 0, float(s))
    result = ProtocolResult(blocks=list(measured), errors={},
                            resampler={"image": f"{image_mode} (antialiased when shrinking)", "tokens": token_mode}, images=n)
    was_training = model.training
    model.eval()
    maps, close = measure(model, blist)
    try:
        base, out0 = maps(x)
        result.map_norm = [float(base[b].norm(dim=1).mean()) for b in result.blocks]
        e0 = embedding(out0)
        if e0 is not None and n > 1:  # centre the embeddings on the clean batch mean (removes the shared component)
            centre = e0.mean(0, keepdim=True)
            e0 = e0 - centre
        else:
            centre = None
        cls: Dict[str, float] = {}
        for name, spec in specs.items():
            k, f, s = spec
            g = _element(name, spec, n, dev)
            if s == 1.0:
                gx = act_image(x, g)
                result.input_change[name] = float((gx - x).flatten(1).norm(dim=1).mean() / x.flatten(1).norm(dim=1).mean().clamp_min(1e-12))
                moved, out = maps(gx)
                pred = {b: rho(base[b], g) for b in base}
            else:
                cells = max(1, int(round(grid * s)))
                result.effective_scale[name] = cells / grid
                xs = act_image(x, GroupElement.from_d4([0] * n, [0] * n, scale=(cells / grid, cells / grid), device=dev),
                               size=(cells * psz[0], cells * psz[1]), mode=image_mode, antialias=True)
                try:
                    moved, out = maps(xs)
                except (RuntimeError, AssertionError, SERError) as err:
                    raise SERError(f"the model rejected {cells * psz[0]} px input for scale {s} ({err}); build it to take other "
                                   "sizes (timm: dynamic_img_size=True) or pass scales=().") from err
                gs = GroupElement.from_d4([0] * n, [0] * n, scale=(cells / grid, cells / grid), device=dev)
                pred = {b: rho(base[b], gs, size=(cells, cells), mode=token_mode) for b in base}
            errs = [map_errors(pred[b], moved[b]) for b in result.blocks]
            result.errors[name] = {m: [e[m] for e in errs] for m in METRICS}
            e1 = embedding(out)
            if e1 is not None and centre is not None:
                e1 = e1 - centre
            if e0 is not None and e1 is not None and has_cls:
                cls[name] = float(1 - F.cosine_similarity(e0.double(), e1.double(), dim=1).mean())
        result.cls_invariance = cls if has_cls and cls else None
        d4 = list(ELEMENTS)
        if "identity" in wanted:
            same, _ = maps(x)
            errs = [map_errors(base[b], same[b]) for b in result.blocks]
            result.controls["identity"] = {m: [e[m] for e in errs] for m in METRICS}
        if "permutation" in wanted:
            gen = torch.Generator().manual_seed(perm_seed)
            perm = torch.randperm(grid * grid, generator=gen).to(dev)
            acc: Dict[str, List[float]] = {m: [0.0] * len(measured) for m in METRICS}
            for name in d4:
                g = _element(name, specs[name], n, dev)
                moved, _ = maps(act_image(x, g))
                for i, b in enumerate(result.blocks):
                    fb = base[b]
                    shuffled = fb.flatten(2)[:, :, perm].view_as(fb)
                    e = map_errors(shuffled, moved[b])
                    for m in METRICS:
                        acc[m][i] += e[m] / len(d4)
            result.controls["permutation"] = acc
    finally:
        close()
        model.train(was_training)
    if "untrained" in wanted:
        twin = untrained if untrained is not None else untrained_copy(model)
        if blocks is not None and not isinstance(blocks, str):
            raise SERError("the untrained control needs blocks=None or a dotted path (a list of modules belongs to the trained model); "
                           "pass controls=('identity', 'permutation') or give the blocks as a dotted path.")
        sub = measure_equivariance(twin, x, scales=(), controls=False, blocks=blocks, patch_size=patch_size, forward=forward, layers=measured)
        result.controls["untrained"] = {m: sub.mean_over(d4, m) for m in METRICS}
    return result
