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
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .distributed import gather_rows, rank, world_size
from .errors import SERError
from .group import GroupElement, rho

__all__ = ["TokenInfoNCE", "TokenHead", "info_nce_tokens", "negative_logsumexp"]

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
        extra_negatives: optional ``(n, T', C)`` more keys whose tokens are negatives for other images'
            queries (same-branch negatives).
        gather: gather keys from all ranks (autograd-aware) when torch.distributed is initialised.
        max_negatives: if set, each call samples this many key tokens as the negative pool (shared by all
            queries of the call), making the cost linear in the number of images.
    Returns:
        ``(sum of per-query losses, number of queries globally)``.
    """
    n, t, _ = q.shape
    qn = F.normalize(q.float(), dim=-1)
    kn = F.normalize(k.float(), dim=-1)
    pos = (qn * kn).sum(-1).flatten() / tau  # (n*T,)
    keys = [kn.reshape(n * t, -1)]
    ids = [torch.arange(n, device=q.device).repeat_interleave(t)]
    if extra_negatives is not None:
        en = F.normalize(extra_negatives.float(), dim=-1)
        keys.append(en.reshape(-1, en.shape[-1]))
        ids.append(torch.arange(n, device=q.device).repeat_interleave(en.shape[1]))
    key_rows = [torch.cat([kr, i[:, None].to(kr.dtype)], dim=1) for kr, i in zip(keys, ids)]
    allk = torch.cat(key_rows)
    offset = 0
    n_global = n * t
    if gather and world_size() > 1:
        # image ids must be global: offset each rank's ids by the images of lower ranks
        img_counts = gather_rows(torch.tensor([[n]], device=q.device, dtype=torch.float32))[0].flatten().long().tolist()
        offset = sum(img_counts[: rank()])
        allk = allk.clone()
        allk[:, -1] += offset
        allk, _ = gather_rows(allk)
        q_counts = gather_rows(torch.tensor([[n * t]], device=q.device, dtype=torch.float32))[0].flatten().long().tolist()
        n_global = sum(q_counts)
    kid = allk[:, -1].detach().round().long()
    kmat = allk[:, :-1]
    if max_negatives is not None and max_negatives < kmat.shape[0]:
        sel = torch.randperm(kmat.shape[0], device=kmat.device if generator is None else generator.device, generator=generator)[:max_negatives].to(kmat.device)
        kmat, kid = kmat.index_select(0, sel), kid.index_select(0, sel)
    qid = torch.arange(n, device=q.device).repeat_interleave(t) + offset
    lse_neg = negative_logsumexp(qn.reshape(n * t, -1), kmat, qid, kid, tau, chunk_elements)
    loss = F.softplus(lse_neg - pos)  # = logaddexp(pos, lse_neg) - pos, without cancellation
    return loss.sum(), n_global


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


class TokenInfoNCE(nn.Module):
    """L_equiv between two token maps and the relative element that aligns them.

    Args:
        tau: temperature (paper: 0.3 MoCo-v3/Barlow Twins, 0.5 DINO; authors' code 0.4-0.5).
        symmetric: average the view1→view2 and view2→view1 directions.
        same_branch_negatives: also use the query branch's other-image tokens as negatives.
        max_negatives: bound on the negative pool per direction (None: all other-image tokens).
        gather: ``"auto"`` gathers keys from all ranks when torch.distributed is initialised.
        interpolation: resampling of ρ's scale part (``"bilinear"`` or ``"bicubic"``).
        chunk_elements: similarity entries processed at once (memory knob, result unchanged).

    Shape:
        ``f1``: ``(n, C, h1, w1)``, ``f2``: ``(n, C, h2, w2)``, ``g``: ``n`` elements mapping view 1's frame
        into view 2's (``g2 ∘ g1⁻¹``). Output: scalar.

    Under torch.distributed the returned value is scaled so that DDP's gradient averaging reproduces the
    single-process loss on the global batch: ``world_size · Σ_local / N_global``.
    """

    def __init__(
        self,
        tau: float = 0.4,
        symmetric: bool = True,
        same_branch_negatives: bool = False,
        max_negatives: Optional[int] = None,
        gather: str | bool = "auto",
        interpolation: str = "bilinear",
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise SERError(f"tau must be a positive finite number, got {tau!r}.")
        if max_negatives is not None and (not isinstance(max_negatives, int) or max_negatives < 1):
            raise SERError(f"max_negatives must be None or a positive int, got {max_negatives!r}.")
        if interpolation not in ("bilinear", "bicubic", "nearest", "area"):
            raise SERError(f"interpolation must be 'bilinear' or 'bicubic' (or nearest/area), got {interpolation!r}.")
        self.tau = float(tau)
        self.symmetric = symmetric
        self.same_branch_negatives = same_branch_negatives
        self.max_negatives = max_negatives
        self.gather = gather
        self.interpolation = interpolation
        self.chunk_elements = int(chunk_elements)

    def forward(
        self,
        f1: Tensor,
        f2: Tensor,
        g: GroupElement,
        keys: Optional[Tuple[Tensor, Tensor]] = None,
        head: Optional[nn.Module] = None,
    ) -> Tensor:
        """Computes L_equiv.

        Args:
            f1, f2: view 1 and view 2 token maps ``(n, C, h, w)``.
            g: relative elements ``g2 ∘ g1⁻¹`` (one per image).
            keys: optional ``(k1, k2)`` maps of a momentum/teacher encoder for the same views, used as
                (no-grad) keys instead of the online maps.
            head: optional token-wise module applied before ρ.
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
        gather = world_size() > 1 if self.gather == "auto" else bool(self.gather)
        if n < 2 and not gather:
            raise SERError(f"L_equiv needs at least 2 images for negatives, got n={n} (maps {tuple(f1.shape)}); raise the b2 share.")
        h2, w2 = f2.shape[-2:]
        z1, z2 = self._head(f1, head), self._head(f2, head)
        z1a = rho(z1, g, size=(h2, w2), mode=self.interpolation)
        if keys is not None:
            with torch.no_grad():
                if not (isinstance(keys, (tuple, list)) and len(keys) == 2 and all(isinstance(k, Tensor) for k in keys)):
                    raise SERError(f"keys must be a pair (k1, k2) of teacher maps shaped like the online maps, got {type(keys).__name__}.")
                k1, k2 = keys
                if k1.shape != f1.shape or k2.shape != f2.shape:
                    raise SERError(
                        f"teacher keys {tuple(k1.shape)}, {tuple(k2.shape)} do not match the online maps {tuple(f1.shape)}, "
                        f"{tuple(f2.shape)}; encode the same two views with the teacher at the same layer."
                    )
                t1 = rho(self._head(k1.detach(), head), g, size=(h2, w2), mode=self.interpolation)
                t2 = self._head(k2.detach(), head)
        else:
            t1, t2 = z1a, z2
        seq = lambda z: rearrange(z, "n c h w -> n (h w) c")  # noqa: E731
        if self.symmetric and keys is None and not self.same_branch_negatives and not gather and (
            self.max_negatives is None or self.max_negatives >= n * h2 * w2
        ) and 2.0 / self.tau <= _MAX_SHIFT_SPAN:
            return self._fused_symmetric(seq(z2), seq(z1a))
        total, count = info_nce_tokens(
            seq(z2), seq(t1), self.tau, extra_negatives=seq(z2) if self.same_branch_negatives else None,
            gather=gather, max_negatives=self.max_negatives, chunk_elements=self.chunk_elements,
        )
        if self.symmetric:
            t_b, c_b = info_nce_tokens(
                seq(z1a), seq(t2), self.tau, extra_negatives=seq(z1a) if self.same_branch_negatives else None,
                gather=gather, max_negatives=self.max_negatives, chunk_elements=self.chunk_elements,
            )
            loss = 0.5 * (total / count + t_b / c_b)
        else:
            loss = total / count
        return loss * (world_size() if gather else 1)

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
        return f"tau={self.tau}, symmetric={self.symmetric}, same_branch_negatives={self.same_branch_negatives}, max_negatives={self.max_negatives}"
