"""Straightforward loop versions of the two searches, and of ARB-LLM's public code: oracles for tests and benchmarks.

One masked binarization per candidate, exactly as the method is described; slow but obviously
right. :mod:`billm.methods.search` must choose the same candidate with the same error.

:func:`arb_reference_loop` is ARB-RC on one linear as the public ARB-LLM code (ZHITENGLI/ARB-LLM)
runs it, written afresh from reading that code: ``tests/data/arb_reference_block0.safetensors``
(``scripts/make_arb_reference.py``) holds its output on two real layers, and ``arb:reference`` must
make the same choices (``tests/test_arb.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from billm.methods.binarize import binarize, sq_error
from billm.methods.search import salient_candidates


def salient_search_loop(M: Tensor, col_score: Tensor, k_min: int, k_max: int, order: int = 2,
                        centred: bool = True) -> tuple[int, Tensor]:
    """Loop oracle of :func:`billm.methods.search.search_salient_columns`: (k, errors (K,))."""
    rows, cols = M.shape
    x = M.to(torch.float64)
    ranking = torch.argsort(col_score, descending=True, stable=True)
    errors = []
    for k in salient_candidates(cols, k_min, k_max).tolist():
        sal = torch.zeros(rows, cols, dtype=torch.bool, device=M.device)
        sal[:, ranking[:k]] = True
        est = binarize(x, sal, order, centred) + binarize(x, ~sal, order, centred)
        errors.append(sq_error(x, est))
    errors_t = torch.stack(errors)
    best = int(torch.argmin(errors_t))
    return int(salient_candidates(cols, k_min, k_max)[best]), errors_t


def break_search_loop(M: Tensor, salient: Tensor, candidates: Tensor, order: int = 1,
                      centred: bool = True) -> tuple[int, Tensor]:
    """Loop oracle of :func:`billm.methods.search.search_break_point`: (index, errors (C,))."""
    x = M.to(torch.float64)
    non = (~salient).unsqueeze(0).expand_as(x)
    errors = []
    for p in candidates.tolist():
        big = x.abs() >= p
        conc, sparse = non & ~big, non & big
        est = binarize(x, conc, order, centred) + binarize(x, sparse, order, centred)
        errors.append((((x - est) ** 2) * non).sum())
    errors_t = torch.stack(errors)
    return int(torch.argmin(errors_t)), errors_t


# ------------------------------------------------------------------------- ARB-LLM (ARB-RC), as the public code runs it


@dataclass
class ArbReference:
    """What :func:`arb_reference_loop` returns for one weight matrix (rows, cols).

    Attributes:
        q: (rows, cols) float32 dequantized weights.
        salient_columns: per block, its salient column indices (absolute, ascending).
        break_points: per block, the chosen break point on the salience.
        groups: (rows, cols) int8, 0 concentrated, 1 sparse, 2 salient.
        signs: (2, rows, cols) int8 in {-1, 0, +1}; plane 1 is 0 off the salient columns. A 0 is an
            exact-zero entry whose sign ``torch.sign`` made 0 (``zero_sign=0``).
        row_scales: (blocks, 4, rows) float32 row scales: concentrated, sparse, salient pass 1, pass 2.
        col_scales: (2, cols) float32 column scales: a non-salient column's concentrated and sparse
            scales, a salient column's pass-1 and pass-2 scales.
    """

    q: Tensor
    salient_columns: list[list[int]]
    break_points: list[float]
    groups: Tensor
    signs: Tensor
    row_scales: Tensor
    col_scales: Tensor

    def to_tensors(self) -> dict[str, Tensor]:
        """The choices and scales, compactly (bit planes packed along columns); ``q`` is rebuilt from them.

        ``salient`` (cols,) bool; ``sparse``, ``sign1``, ``sign2`` (rows, ceil(cols / 8)) uint8, the
        planes "sparse group" and "sign > 0" packed little-endian; ``zero_signs`` (Z, 3) int32 (plane,
        row, col) of the signs that are 0; ``break_points`` (blocks,) float64; ``row_scales``, ``col_scales``.
        """
        pack = lambda plane: torch.from_numpy(np.packbits(plane.numpy(), axis=1, bitorder="little"))  # noqa: E731
        salient = torch.zeros(self.groups.shape[1], dtype=torch.bool)
        salient[[c for cols in self.salient_columns for c in cols]] = True
        zero = self.signs == 0  # (2, rows, cols)
        zero[1] &= salient[None, :]  # off the salient columns plane 2 is 0 by definition
        return {"salient": salient, "sparse": pack(self.groups == 1), "sign1": pack(self.signs[0] > 0),
                "sign2": pack(self.signs[1] > 0), "zero_signs": zero.nonzero().to(torch.int32).contiguous(),
                "break_points": torch.tensor(self.break_points, dtype=torch.float64),
                "row_scales": self.row_scales.contiguous(), "col_scales": self.col_scales.contiguous()}

    @classmethod
    def from_tensors(cls, t: dict[str, Tensor], blocksize: int = 128) -> "ArbReference":
        """Inverse of :meth:`to_tensors`; ``q`` rebuilt by :func:`arb_reference_values`."""
        salient = t["salient"].bool()
        cols, rows = salient.numel(), t["row_scales"].shape[-1]
        unpack = lambda b: torch.from_numpy(  # noqa: E731
            np.unpackbits(b.numpy(), axis=1, count=cols, bitorder="little").astype(bool))
        groups = torch.where(salient[None, :], 2, torch.where(unpack(t["sparse"]), 1, 0)).to(torch.int8)
        signs = torch.stack([torch.where(unpack(t["sign1"]), 1, -1),  # (2, rows, cols)
                             torch.where(unpack(t["sign2"]), 1, -1) * salient[None, :]]).to(torch.int8)
        z = t["zero_signs"].long()
        signs[z[:, 0], z[:, 1], z[:, 2]] = 0
        starts = range(0, cols, blocksize)
        ref = cls(q=torch.empty(0), groups=groups, signs=signs,
                  salient_columns=[salient[st:st + blocksize].nonzero().squeeze(1).add(st).tolist() for st in starts],
                  break_points=t["break_points"].tolist(), row_scales=t["row_scales"], col_scales=t["col_scales"])
        if ref.row_scales.shape != (len(starts), 4, rows):
            raise ValueError(f"row_scales {tuple(ref.row_scales.shape)} do not fit {len(starts)} blocks of {rows} rows")
        ref.q = arb_reference_values(ref, blocksize)
        return ref


def _sign(x: Tensor, zero_sign: float) -> Tensor:
    """``torch.sign``, except that an exact 0 gets ``zero_sign`` (0: as ``torch.sign``)."""
    return torch.where(x == 0, torch.full_like(x, zero_sign), torch.sign(x))


def _row_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean of ``x`` over the True entries of ``m`` in each row (0 for a row with none): (rows,)."""
    n = m.sum(dim=1)
    return torch.where(n > 0, (x * m).sum(dim=1) / n.clamp(min=1), 0.0)


def _col_mean(x: Tensor, m: Tensor) -> Tensor:
    """Mean of ``x`` over the True entries of ``m`` in each column (0 for a column with none): (cols,)."""
    n = m.sum(dim=0)
    return torch.where(n > 0, (x * m).sum(dim=0) / n.clamp(min=1), 0.0)


def _mean_residual_loop(x: Tensor, m: Tensor, order: int, zero_sign: float) -> Tensor:
    """The estimate the public searches score: ``order`` passes of mean-centred binarization of the
    group ``m`` (rows, cols), each on what the passes before left; 0 off the group."""
    est = torch.zeros_like(x)
    for _ in range(order):
        r = x * m - est  # what is left to fit, (rows, cols)
        mu = _row_mean(r, m)  # (rows,)
        d = r - mu[:, None]
        alpha = _row_mean(d.abs(), m)  # (rows,)
        est = est + (alpha[:, None] * _sign(d, zero_sign) + mu[:, None]) * m
    return est


@dataclass
class _RCGroup:
    """One group's ARB-RC code: per pass, signs (rows, cols), row scales (rows,), column scales (cols,)."""

    B: list[Tensor]
    ar: list[Tensor]
    ac: list[Tensor]

    def term(self, p: int, m: Tensor) -> Tensor:
        """Pass ``p``'s estimate ``ac_j * ar_i * B_ij`` on the group ``m``: (rows, cols)."""
        return self.ac[p][None, :] * self.ar[p][:, None] * self.B[p] * m

    def estimate(self, m: Tensor) -> Tensor:
        """The group's estimate, every pass summed: (rows, cols), 0 off the group."""
        est = self.term(0, m)
        for p in range(1, len(self.B)):
            est = est + self.term(p, m)
        return est


def _rc_group_loop(x: Tensor, m: Tensor, order: int, iters: int, zero_sign: float, eps: float = 1e-8) -> _RCGroup:
    """ARB-RC of the group ``m`` of ``x`` (both (rows, cols)), with ``order`` passes (1 or 2).

    Start: each pass, on what the passes before left, takes ``ar = mean |r|`` per row, then
    ``ac = mean |r| / ar`` per column (over the rows with ``ar > 0``) and ``B = sign(r)``. Then
    ``iters`` rounds: for each pass in turn, its row scales and then its column scales by least
    squares against what the other pass leaves (``eps`` added to each denominator); at order 2 each
    entry's sign pair is then re-chosen as the nearest of the four levels ``+-c1 +- c2`` (``c = ar ac``),
    ties to the first of (--, -+, +-, ++). At order 1 the signs stay ``sign(x)``.
    """
    mf = m.to(x.dtype)
    xm = x * mf
    code = _RCGroup([], [], [])
    for p in range(order):  # the one-shot residual passes
        r = xm - code.estimate(mf) if p else xm
        ar = _row_mean(r.abs(), m)  # (rows,)
        ok = m & (ar > 0)[:, None]  # a row whose entries are all 0 says nothing about the columns
        ac = _col_mean(r.abs() / torch.where(ar > 0, ar, 1.0)[:, None], ok)  # (cols,)
        code.B.append(_sign(r, zero_sign) * mf)
        code.ar.append(ar)
        code.ac.append(ac)
    for _ in range(iters):
        for p in range(order):
            target = xm  # what pass p must fit: x less the other pass
            for o in range(order):
                if o != p:
                    target = xm - code.term(o, mf)
            pat = code.ac[p][None, :] * code.B[p] * mf  # row fit, column scales fixed
            code.ar[p] = (pat * target).sum(dim=1) / ((pat * pat).sum(dim=1) + eps)
            pat = code.ar[p][:, None] * code.B[p] * mf  # column fit, row scales fixed
            code.ac[p] = (pat * target).sum(dim=0) / ((pat * pat).sum(dim=0) + eps)
        if order == 2:
            c1 = code.ar[0][:, None] * code.ac[0][None, :]  # (rows, cols)
            c2 = code.ar[1][:, None] * code.ac[1][None, :]
            levels = torch.stack([-c1 - c2, -c1 + c2, c1 - c2, c1 + c2], dim=-1)  # (rows, cols, 4)
            pick = torch.argmin((xm.unsqueeze(-1) - levels).abs(), dim=-1)  # first of equals
            code.B[0] = torch.where(pick >= 2, 1.0, -1.0)
            code.B[1] = torch.where(pick % 2 == 1, 1.0, -1.0)
    return code


def _arb_partition_loop(S: Tensor, k_max: int, n_breaks: int, iters: int,
                        zero_sign: float) -> tuple[list[int], float, Tensor, Tensor, Tensor]:
    """The public code's partition of one block by its salience ``S`` (rows, b).

    Salient count: for k = 1 .. k_max, the top-k columns by summed salience (order-2 mean-centred
    binarization) and the rest (the same), scored by the mean squared error of ``S``; the first least
    wins. Break point: ``n_breaks`` quantiles (10th to 90th percentile) of ``|S|`` with the salient
    columns zeroed; entries with ``|S| >= p`` form the sparse group, the others the concentrated one,
    each scored at order 1 beside the salient group's ARB-RC estimate of ``S``; the first least wins.

    Returns:
        (salient columns (ascending), break point, concentrated, sparse, salient (rows, b) bool masks).
    """
    rows, b = S.shape
    col_score = S.abs().sum(dim=0)  # (b,)
    top = torch.topk(col_score, k_max + 1).indices
    best_err, best_k = float("inf"), 0
    for k in range(1, k_max + 1):
        sal = torch.zeros(rows, b, dtype=torch.bool)
        sal[:, top[:k]] = True
        est = _mean_residual_loop(S, sal, 2, zero_sign) + _mean_residual_loop(S, ~sal, 2, zero_sign)
        err = torch.mean((S - est) ** 2)
        if err < best_err:
            best_err, best_k = err, k
    cols = torch.topk(col_score, best_k).indices
    sal = torch.zeros(rows, b, dtype=torch.bool)
    sal[:, cols] = True
    sal_est = _rc_group_loop(S, sal, 2, iters, zero_sign).estimate(sal.to(S.dtype))  # constant below
    non_abs = (S * ~sal).abs()  # (rows, b), 0 on the salient columns
    levels = torch.linspace(0.10, 0.90, n_breaks)  # float32
    points = torch.tensor(np.quantile(non_abs.reshape(-1).numpy(), levels.numpy()))
    best_err, best_p = float("inf"), None
    for p in points:
        sparse = (non_abs >= p) & ~sal
        conc = (non_abs < p) & ~sal
        est = _mean_residual_loop(S, conc, 1, zero_sign) + _mean_residual_loop(S, sparse, 1, zero_sign) + sal_est
        err = torch.mean((S - est) ** 2)
        if err < best_err:
            best_err, best_p = err, p
    sparse = (non_abs >= best_p) & ~sal
    conc = (non_abs < best_p) & ~sal
    return sorted(cols.tolist()), float(best_p), conc, sparse, sal


def arb_reference_loop(W: Tensor, H: Tensor, blocksize: int = 128, percdamp: float = 0.01, iters: int = 15,
                       k_max: int = 49, n_breaks: int = 81, zero_sign: float = 0.0) -> ArbReference:
    """ARB-RC on one linear as the public ARB-LLM code runs it (``arb-rc``, Hessian salience, one break
    point, salient columns not split): a plain loop over blocks, candidates and passes, in float32.

    ``U = chol(H^-1)`` (upper) of ``H`` damped by ``percdamp * mean(diag H)`` (dead columns: ``H_jj = 1``,
    weights 0). Per block of ``blocksize`` columns: the salience ``w^2 / U_jj^2`` chooses the partition
    (:func:`_arb_partition_loop`); the weights of each group are binarized by ARB-RC (the salient group
    at order 2, the concentrated and sparse groups at order 1, ``iters`` rounds each); the block's
    error ``(w - q) / U_jj``, times ``U``'s rows, is subtracted from the later columns.
    ``zero_sign`` is the sign of an exact zero: 0 as in the public code (``torch.sign``), 1 as billm stores it.

    Args:
        W: (rows, cols) weight.
        H: (cols, cols) Hessian ``2/N sum x x^T`` of the layer's inputs, undamped.

    Returns:
        An :class:`ArbReference`.
    """
    W = W.to(torch.float32).clone()
    H = H.to(torch.float32).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    idx = torch.arange(cols)
    H[idx, idx] += percdamp * torch.mean(torch.diag(H))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # (cols, cols)
    starts = list(range(0, cols, blocksize))
    out = ArbReference(q=torch.zeros(rows, cols), salient_columns=[], break_points=[],
                       groups=torch.zeros(rows, cols, dtype=torch.int8),
                       signs=torch.zeros(2, rows, cols, dtype=torch.int8),
                       row_scales=torch.zeros(len(starts), 4, rows), col_scales=torch.zeros(2, cols))
    for blk, st in enumerate(starts):
        ed = min(st + blocksize, cols)
        Wb = W[:, st:ed].clone()  # (rows, b), compensated by the blocks before
        Ub = U[st:ed, st:ed]  # (b, b)
        d = torch.diag(Ub)  # (b,)
        S = Wb**2 / d[None, :] ** 2  # salience (rows, b)
        sal_cols, p, conc, sparse, sal = _arb_partition_loop(S, k_max, n_breaks, iters, zero_sign)
        codes = {}
        Qb = torch.zeros_like(Wb)
        for name, mask, order in (("salient", sal, 2), ("sparse", sparse, 1), ("conc", conc, 1)):
            codes[name] = _rc_group_loop(Wb, mask, order, iters, zero_sign)
            Qb = Qb + codes[name].estimate(mask.to(Wb.dtype))
        out.q[:, st:ed] = Qb
        if ed < cols:
            W[:, ed:] -= ((Wb - Qb) / d[None, :]).matmul(U[st:ed, ed:])
        # The discrete choices and the scales, laid out like billm's stored form.
        on = torch.tensor([c in sal_cols for c in range(ed - st)])  # (b,) salient columns
        out.salient_columns.append([c + st for c in sal_cols])
        out.break_points.append(p)
        out.groups[:, st:ed] = torch.where(sal, 2, torch.where(sparse, 1, 0)).to(torch.int8)
        sc, ss, sa = codes["conc"], codes["sparse"], codes["salient"]
        out.signs[0, :, st:ed] = torch.where(sal, sa.B[0], torch.where(sparse, ss.B[0], sc.B[0])).to(torch.int8)
        out.signs[1, :, st:ed] = torch.where(sal, sa.B[1], 0.0).to(torch.int8)
        out.row_scales[blk] = torch.stack([sc.ar[0], ss.ar[0], sa.ar[0], sa.ar[1]])
        out.col_scales[0, st:ed] = torch.where(on, sa.ac[0], sc.ac[0])
        out.col_scales[1, st:ed] = torch.where(on, sa.ac[1], ss.ac[0])
    return out


def arb_reference_values(ref: ArbReference, blocksize: int = 128) -> Tensor:
    """The dequantized weights (rows, cols) rebuilt from ``ref``'s groups, signs and scales alone.

    Equals ``ref.q`` bit for bit: each entry is ``ac_j * ar_i * B_ij`` for its group (two passes summed on
    the salient columns), the products taken in the order :func:`arb_reference_loop` takes them.
    """
    rows, cols = ref.groups.shape
    blk = torch.arange(cols) // blocksize  # (cols,) block of each column
    ar = ref.row_scales[blk].permute(1, 2, 0)  # (4, rows, cols)
    g = ref.groups.long()
    B1, B2 = ref.signs[0].float(), ref.signs[1].float()
    ac1 = torch.where(g == 1, ref.col_scales[1][None, :], ref.col_scales[0][None, :])  # (rows, cols)
    ar1 = torch.where(g == 2, ar[2], torch.where(g == 1, ar[1], ar[0]))
    first = ac1 * ar1 * B1
    second = ref.col_scales[1][None, :] * ar[3] * B2
    return torch.where(g == 2, first + second, first)
