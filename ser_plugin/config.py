"""SERConfig: every option of SER in one typed, validated dataclass, and the one way a config is resolved.

Every entry point — :func:`~ser_plugin.attach_ser`, :class:`~ser_plugin.integrations.lightning.SERCallback`,
:class:`~ser_plugin.SERLoss`, the ``--ser-*`` flags (:func:`~ser_plugin.integrations.config_from_args`) and the
Hydra/OmegaConf node (:func:`~ser_plugin.integrations.config_from_structured`) — goes through
:func:`resolve_config`, with one precedence rule::

    base (a SERConfig, or a name in PRESETS; default SERConfig())  →  preset (a name in PRESETS)  →  overrides  →  layer

and one set of errors (an unknown option or preset name, a bad value, no layer where one is needed). Bad
values raise :class:`~ser_plugin.errors.SERError` naming the field, the value and what is allowed
(:mod:`ser_plugin.allowed` holds the allowed values); numpy and 0-d tensor scalars are stored as Python numbers.

Example:
    >>> cfg = SERConfig(layer=6, lam=0.5, head=True)
    >>> cfg = SERConfig.from_kwargs(layer=6, tau=0.3)          # unknown names -> SERError listing valid ones
    >>> cfg = SERConfig.preset("authors", layer=6)             # the SER authors' choices, overridable
    >>> resolve_config("dino", "authors", {"lam": 0.5}).tau    # recipe -> preset -> overrides
    0.5
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union

from torch import nn

from . import allowed as A
from .errors import SERError
from .loss import DEFAULT_CHUNK_ELEMENTS

__all__ = ["SERConfig", "PRESETS", "HOST_RECIPES", "resolve_config", "MODEL_OPTIONS"]

#: The one registry of named settings. Method presets (``"authors"``: the SER authors' released choices) and the
#: SSL objectives' recipes (``"mocov3"``, ``"dino"``, ``"barlow_twins"``: docs/method.md §10) live here together;
#: any name can be a ``base`` or a ``preset`` of :func:`resolve_config`. The recipes: layer 3 (the paper's best
#: top-1 on a 12-block ViT-S/16), the paper's τ (0.3 for MoCo-v3 and Barlow Twins, 0.5 for DINO) and the released
#: code's λ (1.0; 0.3 for DINO), b2_share 0.01 (the paper's 1 % of the large global batches of these recipes).
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
    "mocov3": {"layer": 3, "lam": 1.0, "tau": 0.3, "b2_share": 0.01},
    "dino": {"layer": 3, "lam": 0.3, "tau": 0.5, "b2_share": 0.01},
    "barlow_twins": {"layer": 3, "lam": 1.0, "tau": 0.3, "b2_share": 0.01},
}

#: The registry entries that are SSL objectives' recipes (a read-only view of :data:`PRESETS`; the launchers'
#: defaults, and solo-learn's per-``cfg.method`` choice).
HOST_RECIPES: Mapping[str, Dict[str, Any]] = MappingProxyType({k: PRESETS[k] for k in ("mocov3", "dino", "barlow_twins")})

#: attach_ser / SERCallback keyword arguments that describe the model rather than SER (not config fields)
MODEL_OPTIONS = ("blocks", "patch_size", "num_prefix_tokens", "forward")


def resolve_config(
    base: Union[None, str, SERConfig] = None,
    preset: Optional[str] = None,
    overrides: Optional[Mapping[str, Any]] = None,
    *,
    layer: Any = None,
    require_layer: bool = False,
) -> SERConfig:
    """The SERConfig of any entry point: ``base`` → ``preset`` → ``overrides`` → ``layer`` (later wins).

    Args:
        base: a :class:`SERConfig`, a name in :data:`PRESETS` (e.g. a launcher's recipe) or ``None`` (the defaults).
        preset: a name in :data:`PRESETS` applied on top of ``base``.
        overrides: field values given explicitly (keywords, flags, config keys).
        layer: the layer given positionally (applied last; ``None``: keep the resolved one).
        require_layer: raise when no layer results (the entry points that hook a model).

    Returns:
        A validated SERConfig.

    Raises:
        SERError: an unknown option name (the valid ones are listed), a ``base`` that is neither a SERConfig nor
            a name, an unknown preset name, a bad value, or (``require_layer``) no layer.
    """
    overrides = dict(overrides or {})
    SERConfig.check_names(overrides)
    if isinstance(base, str):
        cfg = SERConfig(**_named(base))
    elif base is None:
        cfg = SERConfig()
    elif isinstance(base, SERConfig):
        cfg = base
    else:
        raise SERError(f"config must be a SERConfig (or a name in ser_plugin.PRESETS), got {type(base).__name__}; build one with SERConfig(...) or pass the options as keywords.")
    if preset is not None:
        overrides = {**_named(preset), **overrides}
    if layer is not None:
        overrides["layer"] = layer
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if require_layer and cfg.layer is None:
        raise SERError("no layer given: SER needs a layer, the block L whose output it regularises (1..depth): layer=L "
                       "(attach_ser(model, L), SERCallback(L)), config=SERConfig(layer=L), --ser-layer L or ser.layer=L.")
    return cfg


def _named(name: Any) -> Dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise SERError(f"unknown preset {name!r}; available: {', '.join(sorted(PRESETS))} (method presets and SSL recipes, ser_plugin.PRESETS).")
    return dict(PRESETS[name])


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
        layer = A.scalar(self.layer)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer == 0):
            raise A.bad("layer", layer, "an int (1..depth, or -depth..-1 from the end) or None")
        self.layer = layer
        self.lam = A.check_number("lam", self.lam, lo=0.0, lo_open=False, allowed="a finite number >= 0")
        self.tau = A.check_tau(self.tau)
        head = A.scalar(self.head)
        if not isinstance(head, (bool, nn.Module)):
            raise A.bad("head", head, "True, False or a token-wise nn.Module")
        self.head = head
        hd, pair = self.head_dims, "a pair of positive ints (hidden, out)"
        if isinstance(hd, (str, bytes)) or not hasattr(hd, "__len__") or len(hd) != 2:
            raise A.bad("head_dims", hd, pair)
        self.head_dims = (A.check_int("head_dims", hd[0], minimum=1, allowed=pair), A.check_int("head_dims", hd[1], minimum=1, allowed=pair))
        for name in ("symmetric", "same_branch_negatives", "rotations", "flips", "late_cls", "check_finite"):
            setattr(self, name, A.check_bool(name, getattr(self, name)))
        self.max_negatives = A.check_optional_int("max_negatives", self.max_negatives)
        self.gather = A.check_gather(self.gather)
        self.interpolation = A.check_choice("interpolation", self.interpolation, A.INTERPOLATIONS)
        self.scale = A.check_scale(self.scale)
        self.ratio = A.check_ratio(self.ratio)
        self.photometric = A.check_photometric(self.photometric)
        self.mean, self.std = A.check_mean_std(self.mean, self.std)
        self.chunk_elements = A.check_int("chunk_elements", self.chunk_elements, minimum=1, allowed="a positive int")
        self.pairing = A.check_pairing(self.pairing, self.rotations, self.flips)
        self.image_interpolation = A.check_choice("image_interpolation", self.image_interpolation, A.IMAGE_INTERPOLATIONS)
        self.scale_frame = A.check_choice("scale_frame", self.scale_frame, A.SCALE_FRAMES)
        b2 = A.check_number("b2_share", self.b2_share, lo=0.0, lo_open=True, allowed="a share in (0, 1]")
        if b2 > 1:
            raise A.bad("b2_share", self.b2_share, "a share in (0, 1]")
        self.b2_share = b2

    @classmethod
    def field_names(cls) -> Tuple[str, ...]:
        """The public option names, in declaration order."""
        return tuple(f.name for f in fields(cls) if not f.name.startswith("_"))

    @classmethod
    def check_names(cls, names: Any) -> None:
        """Raises SERError for any name that is not a field, listing the valid names.

        Raises:
            SERError: an unknown option name (with the closest valid name when there is one).
        """
        valid = cls.field_names()
        unknown = [n for n in names if n not in valid]
        if unknown:
            near = valid + ("preset",) + MODEL_OPTIONS
            hints = [f"{n!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(str(n), near, n=1)) else repr(n) for n in unknown]
            raise SERError(f"unknown SER option(s) {', '.join(hints)}; valid names: {', '.join(valid)}; and preset (a name in "
                           f"ser_plugin.PRESETS); attach_ser and SERCallback also take the model options {', '.join(MODEL_OPTIONS)}.")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> SERConfig:
        """``SERConfig(**kwargs)`` that names the valid options when one is unknown (a typo).

        Raises:
            SERError: an unknown name, or a bad value.
        """
        return resolve_config(None, None, kwargs)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SERConfig:
        """A named entry of :data:`PRESETS` with ``overrides`` applied on top.

        Args:
            name: ``"authors"`` — the SER authors' code: authors' photometrics and pairing, bicubic
                resampling, scale views ``(0.7, 1.3)``, token head, late [CLS], view-1 frame under scale; or an
                SSL recipe, ``"mocov3"``, ``"dino"``, ``"barlow_twins"``.
            **overrides: any field.

        Raises:
            SERError: an unknown preset or option name, or a bad value.
        """
        return resolve_config(None, name, overrides)

    def replace(self, **changes: Any) -> SERConfig:
        """``dataclasses.replace`` with the typo check of :meth:`from_kwargs`."""
        return resolve_config(self, None, changes)
