"""L_equiv: token-level InfoNCE between aligned token maps, memory linear in tokens.

For image ``i`` and aligned grid position ``j`` (aligned: view 1's map moved into view 2's frame by ρ_g):
query ``q_ij`` (view 2), positive key ``k_ij`` (ρ_g of view 1), negatives: every token of every *other*
image (from the key branch; optionally also from the query branch). Tokens of the same image at other
positions are neither positive nor negative. ``s(a, b) = cos(a, b) / τ``; the loss is the mean over
queries of ``-log softmax`` at the positive, symmetrised over the two directions.

The negatives' logsumexp is a custom autograd function that processes the similarity matrix in chunks
and recomputes it in backward (as flash attention does), so neither pass keeps the ``(N, M)`` matrix:
memory is linear in the number of tokens. All similarity arithmetic is fp32, also under autocast.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from . import allowed as A
from .distributed import exchange_sizes, gather_padded, rank, world_size
from .errors import SERError
from .group import GroupElement, rho

__all__ = ["TokenInfoNCE", "TokenHead", "info_nce_tokens", "negative_logsumexp", "raise_if_nonfinite", "FiniteCheck"]

#: similarity entries held at once per chunk (fp32: 64 MiB)
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def _fp32(device: torch.device):
    """Autocast off (similarities in fp32); a no-op on the meta device, which has no autocast (FLOP counting)."""
    if device.type == "meta":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def _chunks(n: int, m: int, budget: int):
    rows = max(1, budget // max(m, 1))
    for s in range(0, n, rows):
        yield s, min(n, s + rows)


def _accumulate(p: Tensor, qf: Tensor, kf: Tensor, gq: Optional[Tensor], gk: Optional[Tensor], s: int, e: int) -> None:
    """Backward of one chunk ``sim[s:e] = qf[s:e]·kfᵀ`` given ``p = dL/dsim`` (already divided by τ)."""
    if gq is not None:
        gq[s:e] = p @ kf
    if gk is not None:
        gk.addmm_(p.t(), qf[s:e])


def _cast(grad: Optional[Tensor], like: Tensor) -> Optional[Tensor]:
    return grad.to(like.dtype) if grad is not None else None


class _NegativeLSE(torch.autograd.Function):
    """``lse_i = log Σ_{j: kid_j ≠ qid_i} exp(q_i·k_j / τ)``, chunked forward and recomputing backward."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, qid: Tensor, kid: Tensor, tau: float, budget: int) -> Tensor:  # type: ignore[override]
        with _fp32(q.device):
            qf, kf = q.float(), k.float()
            out = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
            kt = kf.t()
            for s, e in _chunks(q.shape[0], k.shape[0], budget):
                sim = (qf[s:e] @ kt).div_(tau)
                sim.masked_fill_(qid[s:e, None] == kid[None, :], float("-inf"))
                out[s:e] = torch.logsumexp(sim, dim=1)
        ctx.save_for_backward(q, k, qid, kid, out)
        ctx.tau, ctx.budget = tau, budget
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        q, k, qid, kid, lse = ctx.saved_tensors
        tau, budget = ctx.tau, ctx.budget
        with _fp32(q.device):
            qf, kf = q.float(), k.float()
            gq = torch.zeros_like(qf) if ctx.needs_input_grad[0] else None
            gk = torch.zeros_like(kf) if ctx.needs_input_grad[1] else None
            kt = kf.t()
            g = grad.float()
            # a query with no negative at all (every key masked: lse = -inf) has no gradient; shifting by 0
            # instead of -inf keeps its row exp(-inf - 0) = 0 rather than exp(-inf + inf) = NaN
            lse = lse.masked_fill(torch.isneginf(lse), 0.0)
            for s, e in _chunks(q.shape[0], k.shape[0], budget):
                sim = (qf[s:e] @ kt).div_(tau)
                sim.masked_fill_(qid[s:e, None] == kid[None, :], float("-inf"))
                # dL/dsim = g_i · softmax_ij ; then through sim = q·k/τ
                p = sim.sub_(lse[s:e, None]).exp_().mul_(g[s:e, None] / tau)
                _accumulate(p, qf, kf, gq, gk, s, e)
        return _cast(gq, q), _cast(gk, k), None, None, None, None


class _SymmetricNegativeLSE(torch.autograd.Function):
    """Both directions' negative logsumexps from one similarity matrix (the default symmetric case).

    With the same-image mask symmetric and direction 2's similarities the transpose of direction 1's
    (queries ``q`` = view 2, keys ``k`` = ρ(view 1), and the other way round), one pass over ``S = q·kᵀ/τ``
    yields the row logsumexps (direction 1) and the column logsumexps (direction 2): half the matmuls of two
    separate calls. ``q`` and ``k`` rows must have unit norm: then ``|S| ≤ c = 1/τ``, and ``S`` is shifted by
    ``c`` so one ``exp`` serves rows and columns without overflow (and without a data-dependent maximum);
    the caller uses this path only when ``2c`` is small enough that no entry can underflow (``exp(-2c)``
    stays a normal fp32 number). Queries and keys are grouped by image,
    ``t`` tokens each, so the same-image entries are diagonal blocks, masked by slicing.
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, t: int, tau: float, budget: int) -> Tuple[Tensor, Tensor]:  # type: ignore[override]
        with _fp32(q.device):
            qf, kf = q.float(), k.float()
            c = 1.0 / tau  # rows have unit norm, so S <= c (up to rounding) and exp(S - c) <= 1
            row = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
            col = torch.zeros(k.shape[0], device=q.device, dtype=torch.float32)
            shift = torch.full((1,), -c, device=q.device, dtype=torch.float32)
            kt = kf.t()
            for s, e in _chunks(q.shape[0], k.shape[0], budget):
                ex = _SymmetricNegativeLSE._shifted_exp(qf[s:e], kt, shift, tau, s, e, t)
                row[s:e] = ex.sum(1)
                col += ex.sum(0)
            # log and shift in float64: keeps the absolute error of lse at fp32 rounding of the result, not of c
            row, col = row.double().log_().add_(c).float(), col.double().log_().add_(c).float()
        ctx.save_for_backward(q, k, row, col)
        ctx.t, ctx.tau, ctx.budget, ctx.c = t, tau, budget, c
        return row, col

    @staticmethod
    def _shifted_exp(q: Tensor, kt: Tensor, shift: Tensor, tau: float, s: int, e: int, t: int) -> Tensor:
        """``exp(S[s:e] - c)`` with same-image entries zeroed (scale and shift folded into one addmm)."""
        ex = torch.addmm(shift, q, kt, alpha=1.0 / tau).exp_()
        for img in range(s // t, (e - 1) // t + 1):
            ex[max(img * t, s) - s : min((img + 1) * t, e) - s, img * t : (img + 1) * t] = 0.0
        return ex

    @staticmethod
    def backward(ctx, grad_row: Tensor, grad_col: Tensor):  # type: ignore[override]
        q, k, row, col = ctx.saved_tensors
        t, tau, budget, c = ctx.t, ctx.tau, ctx.budget, ctx.c
        with _fp32(q.device):
            qf, kf = q.float(), k.float()
            gq = torch.zeros_like(qf) if ctx.needs_input_grad[0] else None
            gk = torch.zeros_like(kf) if ctx.needs_input_grad[1] else None
            # dL/dS_ij = a_i·exp(S_ij - row_i) + b_j·exp(S_ij - col_j) = exp(S_ij - c)·(a_i' + b_j'), then S = q·kᵀ/τ
            a = (grad_row.float() / tau) * torch.exp(c - row)
            b = (grad_col.float() / tau) * torch.exp(c - col)
            shift = torch.full((1,), -c, device=q.device, dtype=torch.float32)
            kt = kf.t()
            for s, e in _chunks(q.shape[0], k.shape[0], budget):
                ex = _SymmetricNegativeLSE._shifted_exp(qf[s:e], kt, shift, tau, s, e, t)
                p = ex * a[s:e, None]
                p.addcmul_(ex, b[None, :])
                del ex
                _accumulate(p, qf, kf, gq, gk, s, e)
        return _cast(gq, q), _cast(gk, k), None, None, None


#: the fused symmetric path needs ``exp(-2c)`` (its smallest possible term) to stay a normal fp32 number
_MAX_SHIFT_SPAN = 80.0


def negative_logsumexp(q: Tensor, k: Tensor, qid: Tensor, kid: Tensor, tau: float, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> Tensor:
    """Per-query logsumexp of ``q·k/τ`` over keys of other images; linear memory, exact gradient.

    Args:
        q: ``(N, C)`` queries. k: ``(M, C)`` keys. qid: ``(N,)`` and kid: ``(M,)`` image ids.
    Returns:
        ``(N,)`` fp32.
    """
    return _NegativeLSE.apply(q, k, qid, kid, float(tau), int(chunk_elements))


def _normalized(z: Tensor) -> Tensor:
    return F.normalize(z.float(), dim=-1)


_ID_CACHE: Dict[Tuple[Tuple[Tuple[int, int], ...], str], Tensor] = {}


def _image_ids(layout: Sequence[Tuple[int, int]], device: torch.device) -> Tensor:
    """Image ids of rows laid out rank after rank as ``n_r`` images of ``t_r`` tokens, offset by the images of
    lower ranks. Built on the host (the sizes are host integers) and moved without a sync; cached."""
    key = (tuple((int(a), int(b)) for a, b in layout), str(device))
    ids = _ID_CACHE.get(key)
    if ids is None:
        parts, off = [], 0
        for n_r, t_r in layout:
            parts.append(torch.arange(off, off + n_r).repeat_interleave(t_r))
            off += n_r
        ids = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        ids = ids.to(device, non_blocking=True)
        if len(_ID_CACHE) > 64:
            _ID_CACHE.clear()
        _ID_CACHE[key] = ids
    return ids


def _refuse_one_image(what: str, gathers: bool) -> None:
    """The one rule for a single image, gathered or not: it has no other image to contrast with (its loss would be
    exactly 0, with no gradient), so it is refused; no image at all is an exact zero."""
    no_group = gathers and world_size() == 1
    raise SERError(
        f"L_equiv needs at least 2 images for negatives, {what}: one image has no other image to contrast with, so "
        "its loss would be exactly 0 with no gradient. Raise the b2 share, or drop a last batch this small "
        "(drop_last=True)"
        + ("; gather=True does not help here: no process group with more than one rank is initialised" if no_group else "")
        + ("; or gather negatives from the other ranks with gather=True" if not gathers and world_size() > 1 else "")
        + ". A step with no b2 images at all is fine (its loss is an exact zero)."
    )


def _token_nce(
    dirs: Sequence[Tuple[Tensor, Tensor, Optional[Tensor]]],
    tau: float,
    distributed: bool,
    max_negatives: Optional[int],
    chunk_elements: int,
    generator: Optional[torch.Generator] = None,
) -> Tuple[List[Tuple[Tensor, int]], Optional[Tensor]]:
    """Token InfoNCE for one or more directions sharing one gather.

    Args:
        dirs: per direction ``(q, k, extra)``: queries and aligned keys ``(n, t_d, C)`` (positive of
            ``q[i, a]`` is ``k[i, a]``), optional same-branch negatives ``(n, t_d, C)``.
        distributed: gather every direction's keys (and extras) from all ranks in ONE collective, after
            ONE exchange of the ranks' sizes (two collectives forward, one reduce-scatter backward).
    Returns:
        per direction ``(sum of this rank's per-query losses, number of queries over all ranks)``, and the
        gathered ``(world, width, C)`` key buffer (None without gathering).
    """
    n = dirs[0][0].shape[0]
    dev = dirs[0][0].device
    qs = [_normalized(q) for q, _, _ in dirs]
    ks = [_normalized(k) for _, k, _ in dirs]
    segs = list(ks)
    pools: List[List[int]] = []
    for d, (_, _, e) in enumerate(dirs):
        pools.append([d])
        if e is not None:
            pools[d].append(len(segs))
            segs.append(_normalized(e))
    c = qs[0].shape[-1]
    tokens = [s.shape[1] for s in segs]
    buf: Optional[Tensor] = None
    if distributed:
        sizes = exchange_sizes([n] + tokens, dev)
        if sum(sz[0] for sz in sizes) == 1:  # every rank sees the same sizes: all of them raise, none hangs
            _refuse_one_image(f"got 1 image over all {len(sizes)} ranks (per rank: {[sz[0] for sz in sizes]})", True)
        rows = [r[0] * sum(r[1:]) for r in sizes]
        local = torch.cat([s.reshape(-1, c) for s in segs])
        buf = gather_padded(local, max(rows))
        starts = [[r[0] * sum(r[1 : 1 + j]) for j in range(len(segs))] for r in sizes]
        keys = [
            torch.cat([buf[r, starts[r][j] : starts[r][j] + sz[0] * sz[1 + j]] for r, sz in enumerate(sizes)])
            for j in range(len(segs))
        ]
        kids = [_image_ids([(sz[0], sz[1 + j]) for sz in sizes], dev) for j in range(len(segs))]
        offset = sum(sz[0] for sz in sizes[: rank()])
        n_queries = [sum(sz[0] * sz[1 + d] for sz in sizes) for d in range(len(dirs))]
    else:
        keys = [s.reshape(-1, c) for s in segs]
        kids = [torch.arange(n, device=dev).repeat_interleave(t) for t in tokens]
        offset = 0
        n_queries = [n * tokens[d] for d in range(len(dirs))]
    out = []
    for d in range(len(dirs)):
        t = qs[d].shape[1]
        pos = (qs[d] * ks[d]).sum(-1).flatten() / tau
        kmat = keys[pools[d][0]] if len(pools[d]) == 1 else torch.cat([keys[j] for j in pools[d]])
        kid = kids[pools[d][0]] if len(pools[d]) == 1 else torch.cat([kids[j] for j in pools[d]])
        if max_negatives is not None and max_negatives < kmat.shape[0]:
            sel = torch.randperm(kmat.shape[0], device=kmat.device if generator is None else generator.device, generator=generator)
            sel = sel[:max_negatives].to(kmat.device)
            kmat, kid = kmat.index_select(0, sel), kid.index_select(0, sel)
        qid = torch.arange(offset, offset + n, device=dev).repeat_interleave(t)
        lse_neg = negative_logsumexp(qs[d].reshape(n * t, c), kmat, qid, kid, tau, chunk_elements)
        # -log softmax at the positive = log(1 + exp(lse_neg - pos)); softplus avoids the cancellation of
        # logaddexp - pos, and a query without any negative (lse_neg = -inf) costs exactly 0
        out.append((F.softplus(lse_neg - pos).sum(), n_queries[d]))
    return out, buf


def info_nce_tokens(
    q: Tensor,
    k: Tensor,
    tau: float,
    extra_negatives: Optional[Tensor] = None,
    gather: bool = True,
    max_negatives: Optional[int] = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, int]:
    """One direction of the token InfoNCE.

    Args:
        q: ``(n, T, C)`` queries; ``k``: ``(n, T, C)`` aligned keys (positive of ``q[i, t]`` is ``k[i, t]``).
        tau: temperature.
        extra_negatives: optional ``(n, T, C)`` more keys whose tokens are negatives for other images'
            queries (same-branch negatives).
        gather: gather keys from all ranks (autograd-aware) when torch.distributed is initialised.
        max_negatives: if set, each call samples this many key tokens as the negative pool (shared by all
            queries of the call), making the cost linear in the number of images.
    Returns:
        ``(sum of per-query losses, number of queries globally)``.
    """
    (total, count), _ = _token_nce([(q, k, extra_negatives)], tau, gather and world_size() > 1, max_negatives, chunk_elements, generator)
    return total, count


class TokenHead(nn.Module):
    """Token-wise LayerNorm + MLP (D → hidden → out, GELU, no bias), as in the SER authors' code.

    Shape:
        ``(..., D) -> (..., out)``.
    """

    def __init__(self, dim: int, hidden: int = 512, out: int = 512) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))




def _rho(z: Tensor, g: GroupElement, size: Tuple[int, int], mode: str) -> Tensor:
    """ρ_g to ``size``; a batch of no images keeps its place in the graph (a rank without b2 images)."""
    if z.shape[0] == 0:
        return z.reshape(0, z.shape[1], size[0], size[1])
    return rho(z, g, size=size, mode=mode)


class TokenInfoNCE(nn.Module):
    """L_equiv between two token maps and the relative element that aligns them.

    Args:
        tau: temperature (paper: 0.3 MoCo-v3/Barlow Twins, 0.5 DINO; authors' code 0.4-0.5).
        symmetric: average the view1→view2 and view2→view1 directions.
        same_branch_negatives: also use the query branch's other-image tokens as negatives.
        max_negatives: bound on the negative pool per direction (None: all other-image tokens).
        gather: negatives from all ranks. ``"auto"``: when torch.distributed is initialised with more than one
            rank AND autograd is recording (a loss computed under ``torch.no_grad()`` for logging uses this
            rank's negatives and issues no collective); ``True`` / ``False``: always / never. ``forward``'s
            ``gather=`` overrides it per call.
        interpolation: resampling of ρ's scale part (``"bilinear"`` or ``"bicubic"``).
        chunk_elements: similarity entries processed at once (memory knob, result unchanged).
        scale_frame: the grid of the second direction. ``"view2"``: both directions on view 2's grid (view 1's
            map moved there by ρ_g). ``"view1"`` (the SER authors' code): the second direction on view 1's own
            grid, its keys view 2's map moved into view 1's frame by ρ of ``g⁻¹``. Equal for D4 elements
            (ρ is then a permutation); they differ when ρ resamples (scale).

    Shape:
        ``f1``: ``(n, C, h1, w1)``, ``f2``: ``(n, C, h2, w2)``, ``g``: ``n`` elements mapping view 1's frame
        into view 2's (``g2 ∘ g1⁻¹``). Output: scalar.

    Under torch.distributed the returned value is scaled so that DDP's gradient averaging reproduces the
    single-process loss on the global batch: ``world_size · Σ_local / N_global``. A gathered call issues three
    collectives per step whatever the options: one size exchange and one all-gather in forward, one
    reduce-scatter in backward (none with teacher keys); every rank must make the same gathered calls.

    Online keys (``keys=None``) send gradient through both sides of each similarity; teacher keys stop it on
    the key side. At the same ``λ`` online keys therefore give about twice the gradient (measured ≈ 1.9× at
    τ = 0.4, cosine ≈ 1.0, ``tests/test_loss_numerics.py``): halve ``λ`` to compare with a stop-gradient setup.

    Attributes:
        last_remote_finite: after a gathered call, a ``(world,)`` bool device tensor: whether each rank's
            gathered key rows were finite (for :func:`raise_if_nonfinite`'s ``remote=``); None otherwise.
    """

    def __init__(
        self,
        tau: float = 0.4,
        symmetric: bool = True,
        same_branch_negatives: bool = False,
        max_negatives: Optional[int] = None,
        gather: Union[str, bool] = "auto",
        interpolation: str = "bilinear",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        scale_frame: str = "view2",
    ) -> None:
        super().__init__()
        own = "TokenInfoNCE"  # the same checks and messages as SERConfig (ser_plugin.allowed)
        self._setup(A.check_tau(tau, own), A.check_bool("symmetric", symmetric, own), A.check_bool("same_branch_negatives", same_branch_negatives, own),
                    A.check_optional_int("max_negatives", max_negatives, own), A.check_gather(gather, own),
                    A.check_choice("interpolation", interpolation, A.INTERPOLATIONS, own),
                    A.check_int("chunk_elements", chunk_elements, minimum=1, allowed="a positive int", owner=own),
                    A.check_choice("scale_frame", scale_frame, A.SCALE_FRAMES, own))

    @classmethod
    def from_config(cls, config: Any) -> TokenInfoNCE:
        """The criterion of a validated :class:`~ser_plugin.SERConfig` (its values are not checked again)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        c = config
        self._setup(c.tau, c.symmetric, c.same_branch_negatives, c.max_negatives, c.gather, c.interpolation, c.chunk_elements, c.scale_frame)
        return self

    def _setup(self, tau: float, symmetric: bool, same_branch_negatives: bool, max_negatives: Optional[int], gather: Union[str, bool],
               interpolation: str, chunk_elements: int, scale_frame: str) -> None:
        self.tau = float(tau)
        self.symmetric = symmetric
        self.same_branch_negatives = same_branch_negatives
        self.max_negatives = max_negatives
        self.gather = gather
        self.interpolation = interpolation
        self.chunk_elements = int(chunk_elements)
        self.scale_frame = scale_frame
        self.last_remote_finite: Optional[Tensor] = None

    def _gathers(self, gather: Optional[bool]) -> bool:
        """Whether this call gathers negatives (before checking that a process group exists)."""
        choice = self.gather if gather is None else gather
        if choice == "auto":
            return world_size() > 1 and torch.is_grad_enabled()
        return bool(choice)

    def forward(
        self,
        f1: Tensor,
        f2: Tensor,
        g: GroupElement,
        keys: Optional[Tuple[Tensor, Tensor]] = None,
        head: Optional[nn.Module] = None,
        *,
        gather: Optional[bool] = None,
    ) -> Tensor:
        """Computes L_equiv.

        Args:
            f1, f2: view 1 and view 2 token maps ``(n, C, h, w)``; ``n`` may be 0 on a rank of a gathered call.
            g: relative elements ``g2 ∘ g1⁻¹`` (one per image).
            keys: optional ``(k1, k2)`` maps of a momentum/teacher encoder for the same views, used as
                (no-grad) keys instead of the online maps.
            head: optional token-wise module applied before ρ.
            gather: this call only: ``True`` / ``False`` gathers negatives from all ranks or not, ``None`` uses
                the constructor's ``gather``. A call that gathers must be made by every rank.

        Returns:
            Scalar L_equiv (fp32).

        Raises:
            SERError: malformed maps, keys or elements; exactly 1 image in the batch (over all ranks when gathering).
        """
        for name, f in (("f1", f1), ("f2", f2)):
            if not isinstance(f, Tensor) or f.dim() != 4:
                raise SERError(f"{name} must be a (n, C, h, w) token map, got {tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__}.")
            if not f.is_floating_point() or 0 in f.shape[1:]:
                raise SERError(f"{name} must be a float map with C, h, w > 0, got {tuple(f.shape)} {f.dtype}.")
        if f1.shape[:2] != f2.shape[:2]:
            raise SERError(f"the two views' token maps disagree in images or channels: {tuple(f1.shape)} vs {tuple(f2.shape)}.")
        n = f1.shape[0]
        if not isinstance(g, GroupElement) or len(g) != n:
            raise SERError(f"need one relative element per image: {n} images (maps {tuple(f1.shape)}), got {len(g) if isinstance(g, GroupElement) else type(g).__name__}.")
        gathers = self._gathers(gather)
        distributed = gathers and world_size() > 1
        if n == 1 and not distributed:  # n == 0 (no b2 images this step) flows through: an exact zero
            _refuse_one_image(f"got n=1 (maps {tuple(f1.shape)})", gathers)
        (h1, w1), (h2, w2) = f1.shape[-2:], f2.shape[-2:]
        mode = self.interpolation
        view1 = self.symmetric and self.scale_frame == "view1" and not (h1 == w1 == h2 == w2)
        z1, z2 = self._head(f1, head), self._head(f2, head)
        z1a = _rho(z1, g, (h2, w2), mode)
        g_inv = g.inverse() if view1 else None
        if keys is not None:
            if not (isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, Tensor) for k in keys)):
                raise SERError(f"keys must be a pair (k1, k2) of teacher maps shaped like the online maps, got {type(keys).__name__}.")
            k1, k2 = keys
            if k1.shape != f1.shape or k2.shape != f2.shape:
                raise SERError(
                    f"teacher keys {tuple(k1.shape)}, {tuple(k2.shape)} do not match the online maps {tuple(f1.shape)}, "
                    f"{tuple(f2.shape)}; encode the same two views with the teacher at the same layer."
                )
            with torch.no_grad():
                t1 = _rho(self._head(k1.detach(), head), g, (h2, w2), mode)
                t2 = self._head(k2.detach(), head)
                if view1:
                    t2 = _rho(t2, g_inv, (h1, w1), mode)
        else:
            t1 = z1a
            t2 = _rho(z2, g_inv, (h1, w1), mode) if view1 else z2
        q2 = z1 if view1 else z1a  # the second direction's queries
        seq = lambda z: rearrange(z, "n c h w -> n (h w) c")  # noqa: E731
        self.last_remote_finite = None
        if (
            self.symmetric and keys is None and not self.same_branch_negatives and not distributed and not view1 and n >= 2
            and (self.max_negatives is None or self.max_negatives >= n * h2 * w2) and 2.0 / self.tau <= _MAX_SHIFT_SPAN
        ):
            return self._fused_symmetric(seq(z2), seq(z1a))
        dirs = [(seq(z2), seq(t1), seq(z2) if self.same_branch_negatives else None)]
        if self.symmetric:
            dirs.append((seq(q2), seq(t2), seq(q2) if self.same_branch_negatives else None))
        parts, buf = _token_nce(dirs, self.tau, distributed, self.max_negatives, self.chunk_elements)
        loss = sum((total / count if count > 0 else total * 0.0) for total, count in parts) / len(parts)
        if buf is not None:
            with torch.no_grad():
                self.last_remote_finite = torch.isfinite(buf).flatten(1).all(1)
            # a rank with no images still has the gather in its graph (its empty queries' negatives come from
            # it), so its backward takes part in the reduce-scatter like every other rank's
            loss = loss * world_size()
        return loss

    def _fused_symmetric(self, z2: Tensor, z1a: Tensor) -> Tensor:
        """Both directions from one similarity matrix (single process, all negatives, online keys): same value
        and gradient as the two separate directions, half the matmuls."""
        n, t, _ = z2.shape
        qn = F.normalize(z2.float(), dim=-1).reshape(n * t, -1)
        kn = F.normalize(z1a.float(), dim=-1).reshape(n * t, -1)
        pos = (qn * kn).sum(-1) / self.tau
        lse_row, lse_col = _SymmetricNegativeLSE.apply(qn, kn, t, self.tau, self.chunk_elements)
        # -log softmax at the positive = log(1 + exp(lse_neg - pos)); softplus avoids the cancellation of logaddexp - pos
        total = F.softplus(lse_row - pos).sum() + F.softplus(lse_col - pos).sum()
        return 0.5 * total / (n * t)

    @staticmethod
    def _head(f: Tensor, head: Optional[nn.Module]) -> Tensor:
        if head is None:
            return f
        return rearrange(head(rearrange(f, "n c h w -> n h w c")), "n h w c -> n c h w")

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, symmetric={self.symmetric}, same_branch_negatives={self.same_branch_negatives}, "
            f"max_negatives={self.max_negatives}, gather={self.gather!r}, scale_frame={self.scale_frame!r}"
        )


# ---------------------------------------------------------------------------------------- non-finite checks
NamedMaps = Sequence[Tuple[str, Tensor]]


Extra = Sequence[Tuple[Tensor, str]]


def _summary(value: Optional[Tensor], named_maps: NamedMaps, remote: Optional[Tensor], extra: Extra = (), device: Any = None) -> Tensor:
    """On-device float64 vector ``[value, per map: #NaN, #+Inf, #-Inf, per rank: finite, per extra check: ok]``
    (no host read; ``value`` None reads as 0)."""
    dev = value.device if value is not None else (device if device is not None else "cpu")
    if value is not None and value.numel():
        parts = [value.detach().reshape(-1)[:1].to(torch.float64)]
    else:
        parts = [torch.zeros(1, dtype=torch.float64, device=dev)]
    for _, f in named_maps:
        f = f.detach()
        if not f.is_floating_point():
            parts.append(torch.zeros(3, dtype=torch.float64, device=dev))
            continue
        parts.append(torch.stack([torch.isnan(f).sum(), torch.isposinf(f).sum(), torch.isneginf(f).sum()]).to(dev, torch.float64))
    if remote is not None:
        parts.append(remote.detach().to(dev, torch.float64).reshape(-1))
    for ok, _ in extra:
        parts.append(ok.detach().reshape(-1)[:1].to(dev, torch.float64))
    return torch.cat(parts)


def _message(
    summary: List[float], named_maps: Sequence[Tuple[str, Tuple[int, ...]]], where: str, n_remote: int,
    extra_messages: Sequence[str] = (), check_value: bool = True,
) -> Optional[str]:
    """The SERError text for a host copy of :func:`_summary`, or None when everything checked is fine."""
    value = summary[0]
    k = 1 + 3 * len(named_maps)
    if check_value and not math.isfinite(value):
        at = f" at {where}" if where else ""
        bad = []
        for i, (name, shape) in enumerate(named_maps):
            nan, pinf, ninf = (int(x) for x in summary[1 + 3 * i : 4 + 3 * i])
            kinds = [f"{c} {kind}" for c, kind in ((nan, "NaN"), (pinf, "+Inf"), (ninf, "-Inf")) if c]
            if kinds:
                bad.append(f"{name} {tuple(shape)}: {', '.join(kinds)}")
        if bad:
            return (f"L_equiv is {value}{at}: non-finite values (NaN/Inf) in the {'; '.join(bad)}. The encoder diverged or got bad input "
                    "(check the inputs' range and the learning rate; under fp16 use a GradScaler or bf16).")
        ranks = [r for r, ok in enumerate(summary[k : k + n_remote]) if not ok and r != rank()]
        if ranks:
            who = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(str(r) for r in ranks)
            return (f"L_equiv is {value}{at}: this rank's maps are finite, but the keys gathered from {who} are "
                    "non-finite (NaN/Inf): that rank's encoder diverged or got bad input; its own error names the map.")
        return (f"L_equiv is {value}{at}: the token maps are finite, so the similarities overflowed; check tau "
                "(too small?) and the token head.")
    for ok, msg in zip(summary[k + n_remote :], extra_messages):
        if not ok:
            return msg
    return None


def raise_if_nonfinite(
    value: Optional[Tensor], named_maps: NamedMaps, where: str = "", remote: Optional[Tensor] = None, extra: Extra = (),
) -> None:
    """Raises a SERError naming the non-finite map(s) and the kind of values (NaN, +Inf, -Inf) when ``value`` is
    not finite, or the message of a failed ``extra`` check. One host read (a sync on an accelerator) for all of
    them on the good path.

    Args:
        value: the loss (any shape; checked for all-finite), or None to check only ``extra``.
        named_maps: ``(name, tensor)`` pairs to examine when it is not: e.g. ``("view 1", f1)``, ``("view 2", f2)``,
            ``("teacher key 1", k1)``, ``("view 1 pixels", pair.x1)``.
        where: appended as "at {where}" (e.g. ``"layer 6"``).
        remote: :attr:`TokenInfoNCE.last_remote_finite` after a gathered call: names the rank(s) whose gathered
            keys were non-finite when this rank's maps are finite (instead of blaming tau).
        extra: more device-side checks ``(ok, message)``: a 0-d bool tensor and the SERError text when it is False
            (e.g. the caller's pairing checks), read in the same host read.

    Raises:
        SERError: ``value`` has a NaN or an Inf (checked first), or an ``extra`` check failed.
    """
    flags = ([torch.isfinite(value.detach()).all().reshape(1)] if value is not None else []) + [
        ok.detach().reshape(-1)[:1].to(value.device if value is not None else ok.device) for ok, _ in extra
    ]
    if not flags or all(torch.cat(flags).tolist()):
        return
    summary = _summary(value, named_maps, remote, extra, device=flags[0].device).tolist()
    msg = _message(summary, [(nm, tuple(f.shape)) for nm, f in named_maps], where,
                   0 if remote is None else remote.numel(), [m for _, m in extra], value is not None)
    raise SERError(msg or f"L_equiv is not finite at {where}.")


class FiniteCheck:
    """``check_finite`` with a choice of when the host reads the answer.

    Args:
        mode: ``"sync"``: :func:`raise_if_nonfinite` now (one host read per call). ``"deferred"``: no host read
            on the step: an on-device summary (value, NaN/±Inf counts per named map, per-rank flags) is copied
            to the host without blocking, and a failed step raises its SERError (naming the step) at the
            first later call that finds the copy complete, or at :meth:`flush`. ``"auto"``: ``"sync"`` for CPU
            tensors (a host read costs nothing there), ``"deferred"`` on accelerators.

    Example:
        >>> check = FiniteCheck()                       # doctest: +SKIP
        >>> check(loss, [("view 1", f1), ("view 2", f2)], where="layer 6", remote=crit.last_remote_finite)
    """

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "sync", "deferred"):
            raise SERError(f"FiniteCheck mode must be 'auto', 'sync' or 'deferred', got {mode!r}.")
        self.mode = mode
        self.step = 0
        self._pending: List[Tuple[Tensor, Any, List[Tuple[str, Tuple[int, ...]]], str, int, List[str], bool, int]] = []

    def __call__(
        self, value: Optional[Tensor], named_maps: NamedMaps, where: str = "", remote: Optional[Tensor] = None, extra: Extra = (),
    ) -> None:
        """Checks ``value`` and the ``extra`` checks (see :func:`raise_if_nonfinite` for the arguments).

        Raises:
            SERError: this step's value (sync) or an earlier step's (deferred) was not finite.
        """
        step, self.step = self.step, self.step + 1
        like = value if value is not None else (extra[0][0] if extra else None)
        if like is None:
            return
        deferred = self.mode == "deferred" or (self.mode == "auto" and like.device.type not in ("cpu", "meta"))
        if not deferred:
            self.flush()
            raise_if_nonfinite(value, named_maps, f"{where}, step {step}" if where else f"step {step}", remote, extra)
            return
        self.poll()
        summary = _summary(value, named_maps, remote, extra, device=like.device)
        event = None
        if summary.device.type == "cuda":
            host = torch.empty(summary.shape, dtype=summary.dtype, pin_memory=True)
            host.copy_(summary, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = summary
        host._ser_host_tensor = True  # a completed non-blocking device->host copy: reading it never stalls a device
        self._pending.append((host, event, [(nm, tuple(f.shape)) for nm, f in named_maps], where,
                              0 if remote is None else remote.numel(), [m for _, m in extra], value is not None, step))

    def poll(self, block: bool = False) -> None:
        """Raises for the oldest failed step among the summaries already on the host (all of them if ``block``).

        Raises:
            SERError: a checked step was not finite.
        """
        while self._pending:
            host, event, names, where, n_remote, messages, check_value, step = self._pending[0]
            if event is not None and not event.query():
                if not block:
                    return
                event.synchronize()
            self._pending.pop(0)
            msg = _message(host.tolist(), names, f"{where}, step {step}" if where else f"step {step}", n_remote, messages, check_value)
            if msg is not None:
                self._pending.clear()
                raise SERError(msg)

    def flush(self) -> None:
        """Waits for every pending summary and raises for the first failed step (call at the end of training)."""
        self.poll(block=True)
