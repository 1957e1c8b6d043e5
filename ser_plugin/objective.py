"""SERLoss: the stateless loss entry point every path feeds (captures, ``loss_from_maps``, timm
``forward_intermediates``, adapters). Maps in, ``λ·L_equiv`` out; no hooks, no model."""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from .config import SERConfig, resolve_config
from .errors import SERError
from .group import GroupElement
from .loss import FiniteCheck, TokenHead, TokenInfoNCE
from .views import ViewPair

__all__ = ["SERLoss"]

_FIELDS = frozenset(SERConfig.field_names())
#: options that may change after construction (they take effect at the next call)
SETTABLE = ("lam", "tau")


def refuse_fixed_option(obj: Any, name: str, how: str) -> None:
    """Raises SERError when ``name`` is a SERConfig field other than lam/tau set on a constructed ``obj``.

    Raises:
        SERError: the option cannot change after construction (naming how to get it instead).
    """
    if obj.__dict__.get("_ready") and name in _FIELDS and name not in SETTABLE:
        raise SERError(f"{name} cannot change on a built {type(obj).__name__} (only {', '.join(SETTABLE)} can): " + how.format(name=name) + ".")


class SERLoss(nn.Module):
    """``λ·L_equiv`` between layer-L token maps of two equivariant views (lightly-style: all options in the constructor).

    Args:
        config: a :class:`SERConfig` (default ``SERConfig()``); only its loss fields are used (``lam``,
            ``tau``, ``head``, ``head_dims``, ``symmetric``, ``same_branch_negatives``, ``max_negatives``,
            ``gather``, ``interpolation``, ``chunk_elements``, ``scale_frame``, ``check_finite``).
        dim: token width ``C``; needed to build the head when ``head=True``.
        preset: a name in :data:`~ser_plugin.PRESETS` applied on top of ``config``.
        **options: :class:`SERConfig` fields overriding both (see :func:`~ser_plugin.config.resolve_config`).

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

    def __init__(self, config: Optional[SERConfig] = None, *, dim: Optional[int] = None, preset: Optional[str] = None, **options: Any) -> None:
        super().__init__()
        cfg = resolve_config(config, preset, options)
        self.config = cfg
        self.criterion = TokenInfoNCE.from_config(cfg)
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
        #: device-side ``(all_ok, message)`` checks from the caller, verified with the finite check in one host sync
        self.pending_checks: List[Tuple[Tensor, str]] = []
        self._finite = FiniteCheck("auto")  # immediate on CPU; deferred (no stall) on accelerators
        self._ready = True

    def __setattr__(self, name: str, value: Any) -> None:
        refuse_fixed_option(self, name, "build a new SERLoss({name}=...)")
        super().__setattr__(name, value)

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
        pending, self.pending_checks = self.pending_checks, []
        if self.config.lam == 0.0:
            with torch.no_grad():
                self.last_loss = self.criterion(f1, f2, g, keys, self.head, **kw).detach()
            self._verify(self.last_loss, f1, f2, keys, pending, finite=False, pair=pair_or_relative)
            zero = f1.sum() * 0.0
            if self.head is not None:  # keep the head in the graph (DDP find_unused_parameters=False)
                zero = zero + sum(p.sum() * 0.0 for p in self.head.parameters())
            return zero
        value = self.criterion(f1, f2, g, keys, self.head, **kw)
        self._verify(value, f1, f2, keys, pending, finite=True, pair=pair_or_relative)
        self.last_loss = value.detach()
        return self.config.lam * value

    def _verify(self, value: Tensor, f1: Tensor, f2: Tensor, keys: Any, pending: List[Tuple[Tensor, str]], finite: bool, pair: Any = None) -> None:
        """With ``check_finite``: a finite value and the caller's checks, in at most one host read (none on an
        accelerator: the check is deferred and a failure raises at a later call or at :meth:`flush`)."""
        if not self.config.check_finite or (not finite and not pending):
            return
        maps = [("view 1", f1), ("view 2", f2)] + ([("teacher key 1", keys[0]), ("teacher key 2", keys[1])] if keys is not None else [])
        if isinstance(pair, ViewPair):
            maps += [("view 1 pixels", pair.x1), ("view 2 pixels", pair.x2)]
        self._finite(value if finite else None, maps, where=self.where, remote=self.criterion.last_remote_finite, extra=pending)

    def flush(self) -> None:
        """Raises a deferred non-finite check of an earlier step (waits for it); call at the end of training.

        Raises:
            SERError: a checked step was not finite.
        """
        self._finite.flush()

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
