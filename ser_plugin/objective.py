"""SERLoss: the stateless loss entry point every path feeds (captures, ``loss_from_maps``, timm
``forward_intermediates``, adapters). Maps in, ``λ·L_equiv`` out; no hooks, no model."""

from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import SERConfig
from .errors import SERError
from .group import GroupElement
from .loss import TokenHead, TokenInfoNCE
from .views import ViewPair

__all__ = ["SERLoss"]


class SERLoss(nn.Module):
    """``λ·L_equiv`` between layer-L token maps of two equivariant views (lightly-style: all options in the constructor).

    Args:
        config: a :class:`SERConfig` (default ``SERConfig()``); only its loss fields are used (``lam``,
            ``tau``, ``head``, ``head_dims``, ``symmetric``, ``same_branch_negatives``, ``max_negatives``,
            ``gather``, ``interpolation``, ``chunk_elements``, ``scale_frame``, ``check_finite``).
        dim: token width ``C``; needed to build the head when ``head=True``.
        **options: :class:`SERConfig` fields overriding ``config``.

    Attributes:
        last_loss: the last unweighted L_equiv (detached), also when ``lam == 0``.
        lam, tau: settable; they take effect at the next call (validated like the config).

    Shape:
        ``f1``: ``(n, C, h1, w1)`` view-1 map, ``f2``: ``(n, C, h2, w2)`` view-2 map; output: scalar.

    Raises:
        SERError: bad options, ``head=True`` without ``dim``, bad maps/elements, or (``check_finite``) a
            non-finite loss, naming the non-finite map.

    Example:
        >>> crit = SERLoss(tau=0.4)
        >>> pair = EquivariantViews(patch_size=4, photometric=None)(torch.rand(4, 3, 16, 16))
        >>> f1, f2 = torch.randn(4, 8, 4, 4), torch.randn(4, 8, 4, 4)
        >>> loss = crit(f1, f2, pair)
    """

    def __init__(self, config: Optional[SERConfig] = None, *, dim: Optional[int] = None, **options: Any) -> None:
        super().__init__()
        if config is not None and not isinstance(config, SERConfig):
            raise SERError(f"config must be a SERConfig, got {type(config).__name__}.")
        cfg = (config or SERConfig()).replace(**options) if options else (config or SERConfig())
        self.config = cfg
        kw = dict(scale_frame=cfg.scale_frame) if cfg.scale_frame != "view2" else {}
        self.criterion = TokenInfoNCE(
            cfg.tau, cfg.symmetric, cfg.same_branch_negatives, cfg.max_negatives, cfg.gather, cfg.interpolation, cfg.chunk_elements, **kw
        )
        if cfg.head is True:
            if dim is None:
                raise SERError("head=True needs the token width: pass dim= (the handle detects it), or head=TokenHead(dim) yourself.")
            self.head: Optional[nn.Module] = TokenHead(int(dim), cfg.head_dims[0], cfg.head_dims[1])
        elif isinstance(cfg.head, nn.Module):
            self.head = cfg.head
        else:
            self.head = None
        self.where = "L_equiv"  # named in error messages; the handle sets "layer L"
        self.last_loss: Optional[Tensor] = None

    # ------------------------------------------------------------------ settable options
    @property
    def lam(self) -> float:
        return self.config.lam

    @lam.setter
    def lam(self, value: Any) -> None:
        self.config = self.config.replace(lam=value)

    @property
    def tau(self) -> float:
        return self.config.tau

    @tau.setter
    def tau(self, value: Any) -> None:
        self.config = self.config.replace(tau=value)
        self.criterion.tau = self.config.tau

    # ------------------------------------------------------------------ loss
    def forward(
        self,
        f1: Tensor,
        f2: Tensor,
        pair_or_relative: Union[ViewPair, GroupElement],
        *,
        keys: Optional[Tuple[Tensor, Tensor]] = None,
        gather: Optional[bool] = None,
    ) -> Tensor:
        """``λ·L_equiv``.

        Args:
            f1, f2: view-1 / view-2 maps ``(n, C, h, w)``.
            pair_or_relative: the :class:`ViewPair` the maps come from, or its relative elements ``g2 ∘ g1⁻¹``.
            keys: optional no-grad teacher maps ``(k1, k2)`` of the same views.
            gather: per-call override of the config's ``gather`` (e.g. ``False`` for a rank-local logging call).

        Returns:
            A scalar tensor, ``lam * L_equiv`` (zero with the graph kept when ``lam == 0``).

        Raises:
            SERError: bad maps or elements; a non-finite value when ``check_finite``.
        """
        if isinstance(pair_or_relative, ViewPair):
            g = pair_or_relative.relative
        elif isinstance(pair_or_relative, GroupElement):
            g = pair_or_relative
        else:
            raise SERError(f"the third argument must be the ViewPair of the maps or its relative elements (GroupElement), got {type(pair_or_relative).__name__}.")
        if self.head is not None and isinstance(f1, Tensor) and isinstance(f2, Tensor):
            f1, f2, keys = self._match_head_dtype(f1, f2, keys)
        kw = {} if gather is None else {"gather": bool(gather)}
        if self.config.lam == 0.0:
            with torch.no_grad():
                self.last_loss = self.criterion(f1, f2, g, keys, self.head, **kw).detach()
            zero = f1.sum() * 0.0
            if self.head is not None:  # keep the head in the graph (DDP find_unused_parameters=False)
                zero = zero + sum(p.sum() * 0.0 for p in self.head.parameters())
            return zero
        value = self.criterion(f1, f2, g, keys, self.head, **kw)
        if self.config.check_finite and not bool(torch.isfinite(value)):
            maps = [("view 1", f1), ("view 2", f2)] + ([("teacher key 1", keys[0]), ("teacher key 2", keys[1])] if keys is not None else [])
            bad = [name for name, f in maps if not bool(torch.isfinite(f).all())]
            raise SERError(
                f"L_equiv is {value.item()} at {self.where}: "
                + (f"non-finite values (NaN/Inf) in the {' and '.join(bad)} token map(s) {tuple(f1.shape)}; the encoder diverged or got bad input."
                   if bad else "the token maps are finite, so the similarities overflowed; check tau and the head.")
            )
        self.last_loss = value.detach()
        return self.config.lam * value

    def _match_head_dtype(self, f1: Tensor, f2: Tensor, keys: Any) -> Tuple[Tensor, Tensor, Any]:
        """Maps in the head's parameter dtype (fp16/bf16 models with an fp32 head, or the reverse), unless autocast runs."""
        p = next(self.head.parameters(), None)  # type: ignore[union-attr]
        if p is None or not f1.is_floating_point() or torch.is_autocast_enabled(f1.device.type if f1.device.type != "meta" else "cpu"):
            return f1, f2, keys
        dt = p.dtype
        if keys is not None and isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, Tensor) for k in keys):
            keys = (keys[0].to(dt), keys[1].to(dt))
        return f1.to(dt), f2.to(dt), keys

    def extra_repr(self) -> str:
        return f"lam={self.lam}, tau={self.tau}, head={self.head is not None}"
