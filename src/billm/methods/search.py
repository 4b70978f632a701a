"""Vectorised BiLLM searches: salient column count and non-salient break point.

Both searches score many candidate partitions of a block. Instead of binarizing every candidate
with masked means, each row is sorted once and prefix sums of (count, sum, sum of squares) of the
members of each candidate group are taken along the sorted order. A group is then a union of
index intervals of the sorted row, and everything binarization needs is an interval query:

* order 1: ``mu = S1/n``; ``sum|x - mu| = S1 - 2*S1(x<mu) - mu*(n - 2*n(x<mu))`` (one
  ``searchsorted`` for mu); error ``= sum (x-mu)^2 - n*alpha^2`` because every sign is +-1.
* order 2: the first pass splits the group at mu1 into an upper part (residual x - mu1 - alpha1)
  and a lower part (x - mu1 + alpha1); the second pass's mean, absolute deviation and squared
  deviation are again interval queries on those two parts, at thresholds mu1 +- alpha1 + mu2.

All candidates are scored in a handful of batched tensor operations (float64, row-chunked to
bound memory). ``billm.methods.oracle`` keeps the plain loop versions these are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
DT = torch.float64

_Interval = tuple[Tensor, Tensor]  # (lo, hi) sorted-index bounds of a group part, each (B, R), lo <= hi


class _Prefix:
    """Prefix (count, sum, sum of squares) of a group's members along sorted rows.

    ``P`` is (B, R, n+1, 3), or (1, R, n+1, 3) shared by all B candidates. ``index_map`` (R, N+1)
    maps positions of a longer sorted row into P's rows (P is built on a subset of the row);
    ``minus`` is another prefix subtracted lazily, so a complement group costs no copy.
    """

    def __init__(self, P: Tensor, minus: "_Prefix | None" = None, index_map: Tensor | None = None) -> None:
        self.P = P
        self.minus = minus
        self.index_map = index_map

    @staticmethod
    def build(vals: Tensor, members: Tensor) -> Tensor:
        """(B, R, n+1, 3) prefix of vals (R, n) sorted rows, members (B, R, n) 0/1 in vals.dtype."""
        pad = torch.nn.functional.pad
        feats = torch.stack([torch.ones_like(vals), vals, vals * vals], dim=-1)  # (R, n, 3)
        # A leading zero entry makes position 0 the empty prefix: (B, R, n+1, 3) straight from cumsum.
        return (pad(members, (1, 0)).unsqueeze(-1) * pad(feats, (0, 0, 1, 0))).cumsum(dim=2)

    def at(self, pos: Tensor) -> Tensor:
        """Prefix values at sorted positions ``pos`` (B, R, K) -> (B, R, K, 3)."""
        out = self._own(pos)
        return out if self.minus is None else out - self.minus.at(pos)

    def _own(self, pos: Tensor) -> Tensor:
        B, R, K = pos.shape
        if self.index_map is not None:
            pos = self.index_map.gather(1, pos.permute(1, 0, 2).reshape(R, B * K)).view(R, B, K).permute(1, 0, 2)
        if self.P.shape[0] == 1 and B > 1:  # shared prefix: fold candidates into the gather dim
            idx = pos.permute(1, 0, 2).reshape(1, R, B * K, 1).expand(1, R, B * K, 3)
            return self.P.gather(2, idx).view(R, B, K, 3).permute(1, 0, 2, 3)
        return self.P.gather(2, pos.unsqueeze(-1).expand(B, R, K, 3))


def _ss(vals: Tensor, t: Tensor, right: bool = False) -> Tensor:
    """Batched searchsorted: vals (R, n) sorted rows, t (B, R) -> (B, R) insertion indices."""
    return torch.searchsorted(vals, t.transpose(0, 1).contiguous(), right=right).transpose(0, 1)


class _Group:
    """A candidate group: the members of ``P`` inside index intervals of the sorted rows.

    ``cum(pos)`` gives (count, sum, sumsq) of the group's entries at sorted index < pos, for
    several positions at once, with one gather per call.
    """

    def __init__(self, P: _Prefix, ivs: list[_Interval]) -> None:
        self.P, self.ivs = P, ivs
        ends = torch.stack([b for iv in ivs for b in iv], dim=-1)  # (B, R, 2*len(ivs))
        f = P.at(ends)
        self.base = sum(f[:, :, 2 * i] for i in range(len(ivs)))  # F at the interval starts, summed
        self.total = sum(f[:, :, 2 * i + 1] - f[:, :, 2 * i] for i in range(len(ivs)))  # (B, R, 3)

    def cum(self, pos: Tensor) -> Tensor:
        """pos (B, R, K) sorted indices -> (B, R, K, 3) stats of group entries below them."""
        clamped = [torch.minimum(torch.maximum(pos, lo.unsqueeze(-1)), hi.unsqueeze(-1)) for lo, hi in self.ivs]
        f = self.P.at(torch.cat(clamped, dim=-1))  # (B, R, K*len(ivs), 3)
        K = pos.shape[-1]
        return sum(f[:, :, i * K:(i + 1) * K] for i in range(len(self.ivs))) - self.base.unsqueeze(2)


def _deviations(n: Tensor, s1: Tensor, s2: Tensor, below: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """sum|x - t| and sum (x - t)^2 of a part with stats (n, s1, s2) and ``below`` = stats of x < t."""
    nb, sb = below[..., 0], below[..., 1]
    return s1 - 2 * sb - t * (n - 2 * nb), s2 - 2 * t * s1 + n * t * t


def group_error(P: _Prefix, vals: Tensor, ivs: list[_Interval], order: int, centred: bool) -> Tensor:
    """Squared error of binarizing a group (order 1 or 2) per candidate and row: (B, R).

    The group is the members of ``P`` inside the index intervals ``ivs`` of the sorted rows
    ``vals`` (R, n). Signs are +-1 (sign(0) = +1), so each pass's error is
    ``sum (x - mu)^2 - n * alpha^2``.
    """
    g = _Group(P, ivs)
    n, s1, s2 = g.total.unbind(-1)  # (B, R) each
    nz = n.clamp(min=1)
    mu1 = s1 / nz if centred else torch.zeros_like(s1)
    pos1 = _ss(vals, mu1)
    low = g.cum(pos1.unsqueeze(-1))[:, :, 0]  # (B, R, 3): entries with x < mu1
    abs1, sq1 = _deviations(n, s1, s2, low, mu1)
    alpha1 = abs1 / nz
    if order == 1:
        return (sq1 - n * alpha1 * alpha1).clamp(min=0)
    if order != 2:
        raise ValueError(f"order must be 1 or 2, got {order}")
    # Second pass on the residual: the lower part (x < mu1) is shifted by mu1 - alpha1, the upper by mu1 + alpha1.
    up = g.total - low
    c_up, c_lo = mu1 + alpha1, mu1 - alpha1
    mu2 = (up[..., 1] - up[..., 0] * c_up + low[..., 1] - low[..., 0] * c_lo) / nz if centred else torch.zeros_like(s1)
    t_up, t_lo = c_up + mu2, c_lo + mu2
    p_up = torch.maximum(_ss(vals, t_up), pos1)  # upper-part entries below t_up lie in [pos1, p_up)
    p_lo = torch.minimum(_ss(vals, t_lo), pos1)  # lower-part entries below t_lo lie in [.., p_lo)
    f = g.cum(torch.stack([p_up, p_lo], dim=-1))  # (B, R, 2, 3)
    abs_up, sq_up = _deviations(*up.unbind(-1), f[:, :, 0] - low, t_up)
    abs_lo, sq_lo = _deviations(*low.unbind(-1), f[:, :, 1], t_lo)
    alpha2 = (abs_up + abs_lo) / nz
    return (sq_up + sq_lo - n * alpha2 * alpha2).clamp(min=0)


def _row_chunks(rows: int, per_row: int, budget: int = 1 << 19) -> list[slice]:
    step = max(1, budget // max(per_row, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


@dataclass
class SalientSearch:
    """Result of :func:`search_salient_columns`.

    Attributes:
        k: chosen number of salient columns.
        columns: (k,) long, the chosen column indices (best first).
        candidates: (K,) long, the k values tried.
        errors: (K,) float64, total squared error of each candidate.
    """

    k: int
    columns: Tensor
    candidates: Tensor
    errors: Tensor

    def mask(self, cols: int) -> Tensor:
        """(cols,) bool, True on the salient columns."""
        m = torch.zeros(cols, dtype=torch.bool, device=self.columns.device)
        m[self.columns] = True
        return m


def salient_candidates(cols: int, k_min: int, k_max: int) -> Tensor:
    """The k values to try for a block of ``cols`` columns (at least one column stays non-salient)."""
    hi = min(k_max, cols - 1)
    lo = min(k_min, hi) if hi >= 0 else 0
    return torch.arange(max(lo, 0), max(hi, 0) + 1)


def search_salient_columns(M: Tensor, col_score: Tensor, k_min: int, k_max: int,
                           order: int = 2, centred: bool = True) -> SalientSearch:
    """Choose how many of the top-scoring columns are salient.

    For each k, the top-k columns by ``col_score`` form the salient group and the rest the
    non-salient group; both are binarized at ``order`` and the k with the least total squared
    error of ``M`` wins (the first, on ties).

    Args:
        M: (rows, cols) the matrix the error is measured on (weights or salience).
        col_score: (cols,) column ranking score (summed salience).
        k_min, k_max: range of k (clipped so at least one column stays non-salient).
        order, centred: binarization used to score both groups.
    """
    rows, cols = M.shape
    ks = salient_candidates(cols, k_min, k_max).to(M.device)
    ranking = torch.argsort(col_score, descending=True, stable=True)  # (cols,)
    col_rank = torch.empty_like(ranking)
    col_rank[ranking] = torch.arange(cols, device=M.device)
    x = M.detach().to(DT)
    vals, perm = torch.sort(x, dim=1)  # (rows, cols), both
    sorted_rank = col_rank[perm]  # (rows, cols): rank of the column of each sorted entry
    errors = torch.zeros(len(ks), dtype=DT, device=M.device)
    B = len(ks)
    # Only the top-kmax columns can ever be salient: build the per-candidate prefixes on that
    # subset (B, r, kmax+1, 3) and map full-row sorted positions into it.
    kmax = int(ks.max()) if B else 0
    for sl in _row_chunks(rows, B * (kmax + 1) * 3 + (cols + 1) * 4):
        v = vals[sl].contiguous()  # (r, cols)
        r = v.shape[0]
        in_sub = sorted_rank[sl] < kmax  # (r, cols), kmax True per row, in sorted order
        v_sub = v[in_sub].view(r, kmax)  # (r, kmax) still sorted
        rank_sub = sorted_rank[sl][in_sub].view(r, kmax)
        sal = (rank_sub.unsqueeze(0) < ks.view(-1, 1, 1)).to(DT)  # (B, r, kmax)
        index_map = torch.nn.functional.pad(in_sub.long().cumsum(dim=1), (1, 0))  # (r, cols+1)
        P_sal = _Prefix(_Prefix.build(v_sub, sal), index_map=index_map)
        P_non = _Prefix(_Prefix.build(v, torch.ones_like(v).unsqueeze(0)), minus=P_sal)
        full = [(torch.zeros(B, r, dtype=torch.long, device=M.device), torch.full((B, r), cols, device=M.device))]
        e = group_error(P_sal, v, full, order, centred) + group_error(P_non, v, full, order, centred)  # (B, r)
        errors += e.sum(dim=1)
    best = int(torch.argmin(errors))
    k = int(ks[best])
    return SalientSearch(k=k, columns=ranking[:k], candidates=ks, errors=errors)


def break_candidates(M: Tensor, salient: Tensor, grid: str = "quantile", n: int = 81) -> Tensor:
    """Candidate break points on |M| with the salient columns zeroed.

    ``quantile``: ``numpy.quantile`` of all entries (zeros included) at ``linspace(0.1, 0.9, n)``
    — exactly the reference code's grid. ``linear``: ``linspace(0.1, 0.9, n) * max|M|`` (paper).
    Returns (n,) in M's dtype.
    """
    a = (M * (~salient).to(M.dtype)).abs()  # (rows, cols), salient columns are 0
    q = torch.linspace(0.10, 0.90, n)  # float32, like the reference
    if grid == "quantile":
        p = np.quantile(a.detach().cpu().numpy().reshape(-1), q.numpy())
        return torch.as_tensor(p, dtype=M.dtype, device=M.device)
    if grid == "linear":
        return q.to(device=M.device, dtype=M.dtype) * a.max()
    raise ValueError(f"unknown break grid {grid!r}")


@dataclass
class BreakSearch:
    """Result of :func:`search_break_point`: chosen index/value and every candidate's error (C,)."""

    index: int
    value: float
    candidates: Tensor
    errors: Tensor


def search_break_point(M: Tensor, salient: Tensor, candidates: Tensor, order: int = 1,
                       centred: bool = True) -> BreakSearch:
    """Choose the break point p splitting the non-salient entries by |M| < p (concentrated) / >= p (sparse).

    Each group is binarized separately at ``order``; the candidate with the least total squared
    error of the non-salient entries wins (the first, on ties).

    Args:
        M: (rows, cols).
        salient: (cols,) bool, salient columns (excluded from both groups).
        candidates: (C,) break points.
    """
    x = M[:, ~salient].detach().to(DT)  # (rows, n) non-salient entries
    rows, n = x.shape
    C = candidates.numel()
    p = candidates.detach().to(device=M.device, dtype=DT)
    vals, _ = torch.sort(x, dim=1)
    errors = torch.zeros(C, dtype=DT, device=M.device)
    for sl in _row_chunks(rows, (n + 1) * 3):
        v = vals[sl].contiguous()
        r = v.shape[0]
        P = _Prefix(_Prefix.build(v, torch.ones_like(v).unsqueeze(0)))
        pc = p.view(C, 1).expand(C, r)
        hi = _ss(v, pc)  # first index with v >= p
        lo = torch.minimum(_ss(v, -pc, right=True), hi)  # first index with v > -p
        zero = torch.zeros_like(lo)
        end = torch.full_like(lo, n)
        e = group_error(P, v, [(lo, hi)], order, centred) + group_error(P, v, [(zero, lo), (hi, end)], order, centred)
        errors += e.sum(dim=1)
    best = int(torch.argmin(errors))
    return BreakSearch(index=best, value=float(candidates[best]), candidates=candidates, errors=errors)


def split_masks(M: Tensor, salient: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(concentrated, sparse, salient) boolean (rows, cols) masks for break point ``p``."""
    non = (~salient).unsqueeze(0).expand_as(M)
    big = M.abs() >= p
    return non & ~big, non & big, salient.unsqueeze(0).expand_as(M).clone()
