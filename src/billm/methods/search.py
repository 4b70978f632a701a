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

The salient search needs, for each candidate k, the stats of the row's top-k ranked entries below
a threshold; :class:`_RankPrefix` answers that with a two-level (sqrt) decomposition of the ranks
instead of a (k, position) table per row.

All candidates are scored in a few dozen batched tensor operations (float64, row-chunked to
bound memory). ``tests/oracle.py`` keeps the plain loop versions these are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DT = torch.float64  # search statistics in double precision: the choices must match the loop oracle

_Interval = tuple[Tensor, Tensor]  # (lo, hi) sorted-index bounds of a group part, each (R, B), lo <= hi

# Layout: rows first. R rows of a block, n sorted entries per row, B candidates, P query points.


class _Prefix:
    """Prefix (count, sum, sum of squares) of all entries along the sorted rows ``vals`` (R, n).

    ``minus`` (a :class:`_RankPrefix`) is subtracted lazily, so a complement group costs no copy.
    """

    def __init__(self, vals: Tensor, minus: "_RankPrefix | None" = None) -> None:
        feats = torch.stack([torch.ones_like(vals), vals, vals * vals], dim=-1)  # (R, n, 3)
        self.P = torch.nn.functional.pad(feats, (0, 0, 1, 0)).cumsum(dim=1)  # (R, n+1, 3), P[:, 0] = 0
        self.minus = minus

    def total(self) -> Tensor:
        """Stats of the whole row (less ``minus``'s members): (R, B, 3), or (R, 1, 3) without ``minus``."""
        tot = self.P[:, -1:, :]
        return tot if self.minus is None else tot - self.minus.total()

    def at(self, pos: Tensor) -> Tensor:
        """Stats of the entries before sorted positions ``pos`` (R, B, P) -> (R, B, P, 3)."""
        R, B, P = pos.shape
        out = self.P.gather(1, pos.reshape(R, B * P, 1).expand(R, B * P, 3)).view(R, B, P, 3)
        return out if self.minus is None else out - self.minus.at(pos)


class _RankPrefix:
    """Stats of each candidate's salient entries (the top-b ranked columns of a row) before a position.

    Candidate b's salient set is the row's first b entries in column-rank order. A full
    (R, B, K+1, 3) table would cost O(B*K) per row. Instead ranks are cut in C blocks of
    s ~ sqrt(K): one table holds, for each whole-block prefix (ranks < c*s), the stats below every
    position of the value-sorted top-K entries, (R, C+1, K+1, 3); a second holds, inside each
    block, the stats of its first j ranks below every in-block position, (R, C, s+1, s+1, 3).
    Any query is then two ``searchsorted`` and two gathers.

    Args:
        vals: (R, n) the full sorted rows (positions passed to :meth:`at` index these).
        y: (R, K) the row's entries of the top-K columns, in rank order.
        ks: (B,) candidate counts, each <= K.
    """

    def __init__(self, vals: Tensor, y: Tensor, ks: Tensor) -> None:
        R, K = y.shape
        dev = y.device
        s = math.isqrt(max(K - 1, 0)) + 1
        C = -(-K // s) if K else 1
        self.K, self.s, self.C = K, s, C
        self.vals_ext = torch.nn.functional.pad(vals, (0, 1), value=float("inf"))  # position n -> +inf
        # Whole-block prefixes over the value-sorted top-K entries.
        self.ys, rank_of_sorted = torch.sort(y, dim=1)  # (R, K)
        members = (rank_of_sorted.unsqueeze(1) < (torch.arange(C + 1, device=dev) * s).view(1, -1, 1)).to(y.dtype)
        self.whole = self._prefix(self.ys, members).reshape(-1, 3)  # (R*(C+1)*(K+1), 3)
        # Inside each block: ranks c*s .. c*s+s-1, padded with +inf past K (never below a threshold).
        yb = torch.nn.functional.pad(y, (0, C * s - K), value=float("inf")).view(R, C, s)
        ybs, in_rank = torch.sort(yb, dim=2)  # (R, C, s)
        members = (in_rank.unsqueeze(2) < torch.arange(s + 1, device=dev).view(1, 1, -1, 1)).to(y.dtype)
        self.inner = self._prefix(ybs, members).reshape(-1, 3)  # (R*C*(s+1)*(s+1), 3)
        c_b = torch.div(ks, s, rounding_mode="floor")  # (B,) whole blocks of each candidate
        j_b = ks - c_b * s  # ranks taken from the partial block
        self.c_b = c_b
        self.c_part = c_b.clamp(max=C - 1)
        self.j_b = torch.where(c_b < C, j_b, 0)
        self.ybs_b = ybs[:, self.c_part].contiguous()  # (R, B, s) the partial block's sorted values
        feats = torch.stack([torch.ones_like(y), y, y * y], dim=-1)  # (R, K, 3) in rank order
        rank_cum = torch.nn.functional.pad(feats.cumsum(dim=1), (0, 0, 1, 0))  # (R, K+1, 3)
        self._total = rank_cum[:, ks]  # (R, B, 3): stats of each candidate's whole salient set

    def total(self) -> Tensor:
        """Stats of each candidate's salient set: (R, B, 3)."""
        return self._total

    @staticmethod
    def _prefix(sorted_vals: Tensor, members: Tensor) -> Tensor:
        """sorted_vals (..., m), members (..., J, m) 0/1 -> (..., J, m+1, 3) prefix stats."""
        v = torch.where(torch.isfinite(sorted_vals), sorted_vals, 0.0)
        feats = torch.stack([torch.ones_like(v), v, v * v], dim=-1).unsqueeze(-3)  # (..., 1, m, 3)
        cum = (members.unsqueeze(-1) * feats).cumsum(dim=-2)
        return torch.nn.functional.pad(cum, (0, 0, 1, 0))

    def at(self, pos: Tensor) -> Tensor:
        """Stats of salient entries before full-row positions ``pos`` (R, B, P) -> (R, B, P, 3)."""
        R, B, P = pos.shape
        K, s, C = self.K, self.s, self.C
        # Entries before a left-insertion position are exactly those below the value found there.
        t = self.vals_ext.gather(1, pos.reshape(R, B * P))  # (R, B*P)
        rows = torch.arange(R, device=pos.device).view(R, 1, 1)
        m1 = torch.searchsorted(self.ys, t).view(R, B, P)
        i1 = (rows * (C + 1) + self.c_b.view(1, B, 1)) * (K + 1) + m1
        t = t.view(R, B, P)
        m2 = torch.searchsorted(self.ybs_b, t)  # (R, B, P) in-block positions
        i2 = ((rows * C + self.c_part.view(1, B, 1)) * (s + 1) + self.j_b.view(1, B, 1)) * (s + 1) + m2
        out = self.whole.index_select(0, i1.reshape(-1)) + self.inner.index_select(0, i2.reshape(-1))
        return out.view(R, B, P, 3)


def _ss(vals: Tensor, t: Tensor) -> Tensor:
    """Left insertion points of thresholds ``t`` (R, B) in the sorted rows ``vals`` (R, n)."""
    return torch.searchsorted(vals, t)


class _Group:
    """A candidate group: the members of ``P`` inside index intervals of the sorted rows.

    ``cum(pos)`` gives (count, sum, sumsq) of the group's entries at sorted index < pos, for
    several positions at once, with one gather per call.
    """

    def __init__(self, P: "_Prefix | _RankPrefix", ivs: "list[_Interval] | None") -> None:
        self.P, self.ivs = P, ivs
        if ivs is None:  # the whole row: no interval ends to look up
            self.base, self.total = None, P.total()
            return
        f = P.at(torch.stack([b for iv in ivs for b in iv], dim=-1))  # (R, B, 2*len(ivs), 3)
        self.base = sum(f[:, :, 2 * i] for i in range(len(ivs)))  # stats before each interval start, summed
        self.total = sum(f[:, :, 2 * i + 1] - f[:, :, 2 * i] for i in range(len(ivs)))  # (R, B, 3)

    def cum(self, pos: Tensor) -> Tensor:
        """pos (R, B, K) sorted indices -> (R, B, K, 3) stats of group entries below them."""
        if self.ivs is None:
            return self.P.at(pos)
        clamped = [torch.minimum(torch.maximum(pos, lo.unsqueeze(-1)), hi.unsqueeze(-1)) for lo, hi in self.ivs]
        f = self.P.at(torch.cat(clamped, dim=-1))  # (R, B, K*len(ivs), 3)
        K = pos.shape[-1]
        return sum(f[:, :, i * K:(i + 1) * K] for i in range(len(self.ivs))) - self.base.unsqueeze(2)


def _deviations(n: Tensor, s1: Tensor, s2: Tensor, below: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """sum|x - t| and sum (x - t)^2 of a part with stats (n, s1, s2) and ``below`` = stats of x < t."""
    nb, sb = below[..., 0], below[..., 1]
    return s1 - 2 * sb - t * (n - 2 * nb), s2 - 2 * t * s1 + n * t * t


def group_error(P: "_Prefix | _RankPrefix", vals: Tensor, ivs: "list[_Interval] | None", order: int,
                centred: bool) -> Tensor:
    """Squared error of binarizing a group (order 1 or 2) per row and candidate: (R, B).

    The group is the members of ``P`` inside the index intervals ``ivs`` of the sorted rows
    ``vals`` (R, n) (``None``: the whole row). Signs are +-1 (sign(0) = +1), so each pass's error is
    ``sum (x - mu)^2 - n * alpha^2``.
    """
    g = _Group(P, ivs)
    n, s1, s2 = g.total.unbind(-1)  # (R, B) each
    nz = n.clamp(min=1)
    mu1 = s1 / nz if centred else torch.zeros_like(s1)
    pos1 = _ss(vals, mu1)
    low = g.cum(pos1.unsqueeze(-1))[:, :, 0]  # (R, B, 3): entries with x < mu1
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
    p_lo = torch.minimum(_ss(vals, t_lo), pos1)  # lower-part entries below t_lo lie before p_lo
    f = g.cum(torch.stack([p_up, p_lo], dim=-1))  # (R, B, 2, 3)
    abs_up, sq_up = _deviations(*up.unbind(-1), f[:, :, 0] - low, t_up)
    abs_lo, sq_lo = _deviations(*low.unbind(-1), f[:, :, 1], t_lo)
    alpha2 = (abs_up + abs_lo) / nz
    return (sq_up + sq_lo - n * alpha2 * alpha2).clamp(min=0)


def plain_error(n: Tensor, s_abs: Tensor, s_sq: Tensor) -> Tensor:
    """Squared error of order-1 uncentred binarization of groups with stats (count, sum|x|, sum x^2).

    With ``mu = 0``, ``alpha = sum|x| / n`` and every sign +-1, ``sum (x - alpha*sign x)^2 =
    sum x^2 - (sum|x|)^2 / n`` (0 for an empty group): only two sums per group, no sorted-position
    query. Shapes broadcast.
    """
    return (s_sq - s_abs * s_abs / n.clamp(min=1)).clamp(min=0)


def _abs_sq_prefix(a: Tensor) -> Tensor:
    """(rows, n) -> (2, rows, n+1): prefix sums of |a| and a^2 along the rows (position 0 = 0)."""
    return torch.nn.functional.pad(torch.stack([a.abs(), a * a]).cumsum(dim=2), (1, 0))


def sorted_rows(x: Tensor) -> Tensor:
    """``torch.sort(x, dim=1).values``, (rows, n). On the CPU numpy's sort gives the very same values
    about 3x faster for a block's many short rows (measured: 1536 x 118 float64, 1.2 ms against 3.8 ms)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad:
        return torch.from_numpy(np.sort(x.contiguous().numpy(), axis=1))
    return torch.sort(x, dim=1).values


def _row_chunks(rows: int, per_row: int, budget: int = 1 << 24) -> list[slice]:
    """Row slices holding about ``budget`` working elements each (few, large ops are fastest)."""
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


def salient_candidates(cols: int, k_min: int, k_max: int, device: torch.device | str = "cpu") -> Tensor:
    """The k values to try for a block of ``cols`` columns (at least one column stays non-salient), on ``device``."""
    hi = min(k_max, cols - 1)
    lo = min(k_min, hi) if hi >= 0 else 0
    return torch.arange(max(lo, 0), max(hi, 0) + 1, device=device)


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
    ks = salient_candidates(cols, k_min, k_max, M.device)
    ranking = torch.argsort(col_score, descending=True, stable=True)  # (cols,)
    x = M.detach().to(DT)
    if order == 1 and not centred:  # the error needs only prefix sums along the column ranking
        cum = _abs_sq_prefix(x[:, ranking])  # (2, rows, cols+1)
        sal, kf = cum[:, :, ks], ks.to(DT)  # (2, rows, B): each candidate's salient stats
        non = cum[:, :, -1:] - sal
        errors = (plain_error(kf, sal[0], sal[1]) + plain_error(cols - kf, non[0], non[1])).sum(dim=0)  # (B,)
        k = int(ks[int(torch.argmin(errors))])
        return SalientSearch(k=k, columns=ranking[:k], candidates=ks, errors=errors)
    vals, perm = torch.sort(x, dim=1)  # (rows, cols), both
    errors = torch.zeros(len(ks), dtype=DT, device=M.device)
    B = len(ks)
    # Only the top-kmax columns can ever be salient: build the per-candidate prefixes on that
    # subset (B, r, kmax+1, 3) and map full-row sorted positions into it.
    kmax = int(ks.max()) if B else 0
    top = ranking[:kmax]
    for sl in _row_chunks(rows, (cols + 1) * 4 + B * 64):
        v = vals[sl].contiguous()  # (r, cols)
        P_sal = _RankPrefix(v, x[sl][:, top], ks)
        P_non = _Prefix(v, minus=P_sal)
        e = group_error(P_sal, v, None, order, centred) + group_error(P_non, v, None, order, centred)  # (r, B)
        errors += e.sum(dim=0)
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
    if grid == "quantile":  # numpy.quantile runs on the host: the levels live there too
        q = torch.linspace(0.10, 0.90, n, device="cpu")  # float32, like the reference
        p = np.quantile(a.detach().cpu().numpy().reshape(-1), q.numpy())
        return torch.as_tensor(p, dtype=M.dtype, device=M.device)
    if grid == "linear":
        return torch.linspace(0.10, 0.90, n, device=M.device).to(M.dtype) * a.max()
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
    if order == 1 and not centred:  # each group is a prefix / suffix of the row sorted by |x|
        a = sorted_rows(x.abs())  # (rows, n)
        cum = _abs_sq_prefix(a)  # (2, rows, n+1)
        pos = torch.searchsorted(a, p.view(1, C).expand(rows, C).contiguous())  # (rows, C): first |x| >= p
        conc = cum.gather(2, pos.unsqueeze(0).expand(2, -1, -1))  # (2, rows, C): entries with |x| < p
        sparse = cum[:, :, -1:] - conc
        nc = pos.to(DT)
        errors = (plain_error(nc, conc[0], conc[1]) + plain_error(n - nc, sparse[0], sparse[1])).sum(dim=0)  # (C,)
        best = int(torch.argmin(errors))
        return BreakSearch(index=best, value=float(candidates[best]), candidates=candidates, errors=errors)
    vals, _ = torch.sort(x, dim=1)
    errors = torch.zeros(C, dtype=DT, device=M.device)
    for sl in _row_chunks(rows, (n + 1) * 3 + C * 64):
        v = vals[sl].contiguous()
        r = v.shape[0]
        P = _Prefix(v)
        pc = p.view(1, C).expand(r, C).contiguous()
        hi = _ss(v, pc)  # first index with v >= p
        lo = torch.minimum(torch.searchsorted(v, -pc, right=True), hi)  # first index with v > -p
        zero = torch.zeros_like(lo)
        end = torch.full_like(lo, n)
        e = group_error(P, v, [(lo, hi)], order, centred) + group_error(P, v, [(zero, lo), (hi, end)], order, centred)
        errors += e.sum(dim=0)
    best = int(torch.argmin(errors))
    return BreakSearch(index=best, value=float(candidates[best]), candidates=candidates, errors=errors)


def split_masks(M: Tensor, salient: Tensor, p: float) -> tuple[Tensor, Tensor, Tensor]:
    """(concentrated, sparse, salient) boolean (rows, cols) masks for break point ``p``."""
    non = (~salient).unsqueeze(0).expand_as(M)
    big = M.abs() >= p
    return non & ~big, non & big, salient.unsqueeze(0).expand_as(M).clone()


# Searches scored by output error under H. Inside the OBC loop, a block of b columns quantized with
# error E (rows, b), the later columns then compensated optimally, costs the layer
# sum_rows e ([H_F^-1]_bb)^-1 e^T = ||E U_bb^-1||^2, U = chol(H^-1) upper (so [H_F^-1]_bb = U_bb^T U_bb).
# Each candidate's block is binarized explicitly, (B, rows, b), and scored with one batched product.


def binarize_masked(x: Tensor, masks: Tensor, order: int, centred: bool) -> Tensor:
    """Residual binarization of each candidate's group: x (rows, b), masks (B, rows, b) bool -> (B, rows, b).

    Per row and pass: ``mu`` (0 unless centred), ``alpha = mean|x - mu|`` over the group, signs +-1
    (sign(0) = +1); 0 off the group. Scales are kept exact (the search's estimate, not the stored one).
    """
    m = masks.to(x.dtype)
    n = m.sum(dim=-1, keepdim=True).clamp(min=1)  # (B, rows, 1)
    out = torch.zeros_like(m)
    for _ in range(order):
        r = x - out
        mu = (r * m).sum(dim=-1, keepdim=True) / n if centred else torch.zeros_like(n)
        d = r - mu
        alpha = (d.abs() * m).sum(dim=-1, keepdim=True) / n
        out = out + (alpha * torch.where(d >= 0, 1.0, -1.0) + mu) * m
    return out


def output_errors(Wb: Tensor, Q: Tensor, Ub: Tensor) -> Tensor:
    """||(Wb - Q_c) Ub^-1||^2 per candidate c: Wb (rows, b), Q (B, rows, b), Ub (b, b) upper -> (B,) float64."""
    E = (Wb.unsqueeze(0) - Q).to(DT)  # (B, rows, b)
    Uinv = torch.linalg.solve_triangular(Ub.to(DT), torch.eye(Ub.shape[0], dtype=DT, device=Ub.device), upper=True)
    return E.matmul(Uinv).pow(2).sum(dim=(1, 2))


def search_salient_output(Wb: Tensor, Ub: Tensor, col_score: Tensor, k_min: int, k_max: int, order: int,
                          centred: bool) -> SalientSearch:
    """:func:`search_salient_columns` scored by output error under H (the salient group at ``order``,
    the rest as one group at order 1)."""
    rows, cols = Wb.shape
    ks = salient_candidates(cols, k_min, k_max, Wb.device)  # (B,)
    ranking = torch.argsort(col_score, descending=True, stable=True)
    col_rank = torch.empty_like(ranking)
    col_rank[ranking] = torch.arange(cols, device=Wb.device)
    sal = (col_rank.unsqueeze(0) < ks.unsqueeze(1)).unsqueeze(1).expand(-1, rows, -1)  # (B, rows, cols)
    Q = binarize_masked(Wb, sal, order, centred) + binarize_masked(Wb, ~sal, 1, centred)
    errors = output_errors(Wb, Q, Ub)
    best = int(torch.argmin(errors))
    k = int(ks[best])
    return SalientSearch(k=k, columns=ranking[:k], candidates=ks, errors=errors)


def search_break_output(Wb: Tensor, Ub: Tensor, salient: Tensor, candidates: Tensor, salient_order: int,
                        centred: bool) -> BreakSearch:
    """:func:`search_break_point` scored by output error under H of the whole block code (the salient
    columns at ``salient_order``, each split group at order 1)."""
    rows, cols = Wb.shape
    sal = salient.unsqueeze(0).expand(rows, -1)  # (rows, cols)
    Qsal = binarize_masked(Wb, sal.unsqueeze(0), salient_order, centred)  # (1, rows, cols)
    big = Wb.abs().unsqueeze(0) >= candidates.to(Wb.dtype).view(-1, 1, 1)  # (C, rows, cols)
    non = ~sal.unsqueeze(0)
    Q = Qsal + binarize_masked(Wb, non & ~big, 1, centred) + binarize_masked(Wb, non & big, 1, centred)
    errors = output_errors(Wb, Q, Ub)
    best = int(torch.argmin(errors))
    return BreakSearch(index=best, value=float(candidates[best]), candidates=candidates, errors=errors)


def search_sparse_columns_output(Wb: Tensor, Ub: Tensor, salient: Tensor, salient_order: int, centred: bool,
                                 max_candidates: int = 32) -> Tensor:
    """The per-column split scored by output error under H: (cols,) bool sparse-group columns.

    The non-salient columns ranked by mean |w|; the top j (j from 0 to n - 1, at most
    ``max_candidates`` values evenly spaced) form the sparse group.
    """
    rows, cols = Wb.shape
    non = (~salient).nonzero().squeeze(1)  # (n,)
    n = non.numel()
    step = max(1, -(-n // max_candidates))
    js = torch.arange(0, n, step, device=Wb.device)  # (J,)
    order_ = torch.argsort(Wb[:, non].abs().mean(dim=0), descending=True, stable=True)
    rank = torch.full((cols,), cols, dtype=torch.long, device=Wb.device)
    rank[non[order_]] = torch.arange(n, device=Wb.device)
    sparse_cols = rank.unsqueeze(0) < js.unsqueeze(1)  # (J, cols), never salient (rank = cols there)
    sal = salient.unsqueeze(0).expand(rows, -1)
    Qsal = binarize_masked(Wb, sal.unsqueeze(0), salient_order, centred)
    sp = sparse_cols.unsqueeze(1).expand(-1, rows, -1)  # (J, rows, cols)
    conc = ~sp & ~sal.unsqueeze(0)
    Q = Qsal + binarize_masked(Wb, conc, 1, centred) + binarize_masked(Wb, sp, 1, centred)
    best = int(torch.argmin(output_errors(Wb, Q, Ub)))
    return sparse_cols[best]
