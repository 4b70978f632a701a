"""ARB-LLM on one weight matrix: BiLLM's partition, each group binarized by alternating refinement.

After Li et al., "ARB-LLM: Alternating Refined Binarizations for Large Language Models" (ICLR 2025).
Per OBC block, the partition is BiLLM's (column-group bitmap): the salient columns (by the Hessian
salience ``w^2 / U_jj^2``), binarized at order 2, and a break point splitting the other entries into
a concentrated and a sparse group, each binarized at order 1. Every group (per row, over its
entries ``m``) is then refined:

* ``plain`` (ARB): from ``mu = mean w``, ``alpha = mean |w - mu|``, ``B = sign(w - mu)``, repeat
  ``iters`` times: ``mu = mean(w - alpha B)``; ``alpha = mean(B (w - mu))`` (least squares, B fixed);
  ``B = sign(w - mu)``. Order 2 keeps one mean and two scales, ``alpha1, alpha2`` updated one after
  the other, and picks each entry's sign pair among the four values ``+-alpha1 +- alpha2``.
* ``x`` (ARB-X): ARB, then ``x_iters`` rounds of the mean and scales re-solved (signs fixed) for
  the least ``d S d^T`` per row, ``d`` the group's error and ``S`` the block of the Hessian.
* ``rc`` (ARB-RC): no mean; ``w ~ alpha_r[i] alpha_c[j] B``, a row and a column scale, each the
  least-squares fit with the other fixed, ``iters`` times; order 2 refits both passes' scales and
  then the sign pairs.

Each block's error is pushed onto the later columns by the shared OBC loop (nothing inside a block).
Scales and means are rounded to ``scale_dtype`` once refined, and the block's weights are decoded
from them by the format's own decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, QuantConfig, SalientMetric, SearchDomain, check, option
from ..packing.formats import (FieldSpec, Format, Meta, Shape, StoredWeight, Tensors, block_index, n_blocks,
                               per_column, pm1, register_format, round_to_stored, scale_dtype)
from .billm import BILLM_SLOTS, billm_pack, partition_fields, salience, unpack_partition
from .binarize import sign_pm1
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method
from .search import break_candidates, search_break_point, search_salient_columns, split_masks


# ----------------------------------------------------------------------------- config

_ARB_VARIANTS = ("rc", "x", "plain")


@dataclass(frozen=True)
class ArbConfig(QuantConfig):
    """ARB-LLM: BiLLM's partition (salient columns + a bitmap splitting the rest) binarized by alternating refinement.

    Every group is binarized and then refined in ``iters`` alternating rounds: ``plain`` (ARB)
    updates a per-row mean, a per-row scale and the signs in turn; ``x`` (ARB-X) then refits mean
    and scales for the least output error under the block's Hessian; ``rc`` (ARB-RC) drops the mean
    and alternates a per-row and a per-column scale. Salient columns keep two sign planes (order 2).
    Presets: ``rc`` (the default), ``x``, ``plain``, and ``reference`` (the public code's choices:
    searches scored on the salience matrix, float32 scales; docs/methods.md).
    """

    method: ClassVar[str] = "arb"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "rc": dict(variant="rc"),
        "x": dict(variant="x"),
        "plain": dict(variant="plain"),
        "reference": dict(variant="rc", search_domain="salience", scale_dtype="float32"),
    }
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**QuantConfig.abbrev, "t": "iters"}
    storage_estimate: ClassVar[float] = 3.5

    variant: str = option("rc", "rc: row and column scales, no mean (ARB-RC); x: mean and row scale refit under the "
                                "Hessian (ARB-X); plain: mean, row scale and signs alternated (ARB)",
                          choices=_ARB_VARIANTS)
    iters: int = option(15, "alternating refinement rounds per group (T)")
    x_iters: int = option(15, "ARB-X: rounds of the Hessian-weighted mean and scale update after the alternation")
    salient_metric: SalientMetric = option(SalientMetric.HESSIAN, "salience of a weight: hessian (w^2 / U_jj^2) "
                                                                  "or magnitude (|w|)")
    search_domain: SearchDomain = option(SearchDomain.WEIGHT, "what the two searches score: the weights or the "
                                                              "salience matrix (public code)")
    min_salient_cols: int = option(1, "fewest salient columns tried per block")
    max_salient_cols: int = option(49, "most salient columns tried per block")
    n_break_candidates: int = option(81, "break points tried: quantiles of |w| from the 10th to the 90th percentile")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.min_salient_cols <= self.max_salient_cols,
               f"need 0 <= min_salient_cols <= max_salient_cols, got {self.min_salient_cols}, {self.max_salient_cols}")
        check(0 <= self.iters <= 100, f"iters must be in 0..100, got {self.iters}")
        check(0 <= self.x_iters <= 100, f"x_iters must be in 0..100, got {self.x_iters}")
        check(self.search_domain != SearchDomain.OUTPUT, "search_domain output is BiLLM's (arb: weight or salience)")
        check(self.n_break_candidates >= 1, "n_break_candidates must be >= 1")


# ----------------------------------------------------------------------------- stored format: arb (ARB-LLM)
#
# ``signs`` (r, c) first sign plane; ``signs2`` (r, k) second plane of the k salient columns;
# ``group`` (r, c-k) bitmap of the non-salient entries (1 = sparse group); ``salient_mask`` (c,);
# ``scales`` (nb, 4, r) row scales per block, slots as :data:`ARB_SLOTS`. Then either (ARB-RC,
# ``meta['rc']``) ``col_scales`` (2, c): on a non-salient column the concentrated and sparse
# groups' column scales, on a salient column those of its two passes; or (ARB, ARB-X) ``means``
# (nb, 3, r): one mean per block, row and group (concentrated, sparse, salient).

ARB_SLOTS = BILLM_SLOTS


def arb_values(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Tensor, scales: Tensor, means: Optional[Tensor],
               col_scales: Optional[Tensor], blocksize: int) -> Tensor:
    """Decode ARB-LLM from unpacked bits.

    Args:
        s1, s2: (r, c) bool sign planes (``s2`` used on salient columns only).
        salient: (c,) bool salient-column flags.
        sparse: (r, c) bool, True for the sparse group (ignored on salient columns).
        scales: (nb, 4, r) float32 row scales, slots as :data:`ARB_SLOTS`.
        means: (nb, 3, r) float32 means (concentrated, sparse, salient) or None (ARB-RC).
        col_scales: (2, c) float32 column scales (ARB-RC) or None.
        blocksize: columns per block.

    Returns:
        (r, c) float32: ``a * s1`` with the entry's group row scale ``a`` (times its column scale), plus
        the second pass on salient columns, plus the group's mean when there are means.
    """
    blk = block_index(s1.shape[1], blocksize, s1.device)
    sal = salient.unsqueeze(0)  # (1, c)

    def slot(t: Tensor, i: int) -> Tensor:
        return per_column(t[:, i, :].t(), blk)  # (r, c)

    a1 = torch.where(sal, slot(scales, 2), torch.where(sparse, slot(scales, 1), slot(scales, 0)))
    a2 = torch.where(sal, slot(scales, 3), 0.0)
    if col_scales is not None:
        a1 = a1 * torch.where(sparse & ~sal, col_scales[1:2], col_scales[0:1])
        a2 = a2 * col_scales[1:2]
    q = a1 * pm1(s1) + a2 * pm1(s2)
    if means is not None:
        q = q + torch.where(sal, slot(means, 2), torch.where(sparse, slot(means, 1), slot(means, 0)))
    return q


def _arb_fields(shape: Shape, meta: Meta) -> dict[str, FieldSpec]:
    r, c = shape
    nb, sd = n_blocks(c, meta["blocksize"]), scale_dtype(meta)
    f = {**partition_fields(shape, meta["n_salient"], order=2), "scales": FieldSpec((nb, 4, r), sd, "scales")}
    if meta["rc"]:
        f["col_scales"] = FieldSpec((2, c), sd, "column scales")
    else:
        f["means"] = FieldSpec((nb, 3, r), sd, "means")
    return f


def arb_pack(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Tensor, scales: Tensor, means: Optional[Tensor],
             col_scales: Optional[Tensor], meta: Meta) -> Tensors:
    """Packed ARB-LLM fields: BiLLM's partition and scales (and means), plus ARB-RC's column scales."""
    out = billm_pack(s1, salient, sparse, s2, scales, means, meta)
    if col_scales is not None:
        out["col_scales"] = col_scales.to(scale_dtype(meta))
    return out


def _arb_decode(t: Tensors, shape: Shape, meta: Meta) -> Tensor:
    s1, sal, sparse, s2 = unpack_partition(t, shape, meta["n_salient"], order=2)
    means = None if meta["rc"] else t["means"].float()
    cols = t["col_scales"].float() if meta["rc"] else None
    return arb_values(s1, sal, sparse, s2, t["scales"].float(), means, cols, meta["blocksize"])


def _arb_weight_bits(shape: Shape, meta: Meta) -> float:
    return (shape[1] + meta["n_salient"]) / shape[1]  # one sign plane, a second on the salient columns


# no layout: column scales (RC) and one mean per group have no fast path yet; every call decodes
ARB_FORMAT = register_format(Format("arb", _arb_fields, _arb_decode, _arb_weight_bits))


# ----------------------------------------------------------------------------- quantizer



def _ratio(num: Tensor, den: Tensor, old: Optional[Tensor] = None) -> Tensor:
    """``num / den`` where ``den > 0``; elsewhere ``old`` (or 0): an empty group keeps its value."""
    keep = torch.zeros_like(num) if old is None else old
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), keep)


def _best_pair(y: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """The sign pair (B1, B2), each +-1, whose ``B1 a1 + B2 a2`` is nearest ``y``; ties take the first of
    (--, -+, +-, ++). ``a1``, ``a2`` broadcast against ``y`` (rows, cols)."""
    a1, a2 = a1.expand_as(y), a2.expand_as(y)
    v = torch.stack([-a1 - a2, -a1 + a2, a1 - a2, a1 + a2], dim=-1)  # (rows, cols, 4)
    idx = torch.argmin((y.unsqueeze(-1) - v).abs(), dim=-1)
    return torch.where(idx >= 2, 1.0, -1.0), torch.where(idx % 2 == 1, 1.0, -1.0)


# ----------------------------------------------------------------------------- ARB (mean + row scale)

def arb_order1(x: Tensor, m: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """ARB on the group ``m`` of ``x`` (both (rows, cols)): returns (B (rows, cols) +-1, alpha (rows,), mu (rows,))."""
    mf = m.to(x.dtype)
    n = mf.sum(1).clamp(min=1)
    mu = (x * mf).sum(1) / n
    alpha = ((x - mu[:, None]).abs() * mf).sum(1) / n
    B = sign_pm1(x - mu[:, None])
    for _ in range(iters):
        mu = ((x - alpha[:, None] * B) * mf).sum(1) / n  # mean, alpha and B fixed
        alpha = (B * (x - mu[:, None]) * mf).sum(1) / n  # scale, mean and B fixed (B^2 = 1)
        B = sign_pm1(x - mu[:, None])  # signs, mean and scale fixed
    return B, alpha, mu


def arb_order2(x: Tensor, m: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """ARB at order 2 (one shared mean): returns (B1, B2 (rows, cols) +-1, alpha1, alpha2, mu (rows,))."""
    mf = m.to(x.dtype)
    n = mf.sum(1).clamp(min=1)
    B1, a1, mu1 = arb_order1(x, m, 0)  # residual binarization as the starting point
    B2, a2, mu2 = arb_order1(x - (a1[:, None] * B1 + mu1[:, None]), m, 0)
    mu = mu1 + mu2
    for _ in range(iters):
        mu = ((x - a1[:, None] * B1 - a2[:, None] * B2) * mf).sum(1) / n
        a1 = (B1 * (x - mu[:, None] - a2[:, None] * B2) * mf).sum(1) / n
        a2 = (B2 * (x - mu[:, None] - a1[:, None] * B1) * mf).sum(1) / n
        B1, B2 = _best_pair(x - mu[:, None], a1[:, None], a2[:, None])
    return B1, B2, a1, a2, mu


def arb_x_refit(x: Tensor, m: Tensor, S: Tensor, Bs: list[Tensor], alphas: list[Tensor], mu: Tensor,
                iters: int) -> tuple[list[Tensor], Tensor]:
    """ARB-X: with the signs fixed, re-solve the group's mean and scales for the least ``d S d^T`` per row.

    ``d = (x - sum_k alpha_k B_k - mu) * m`` is the group's error and ``S`` (cols, cols) the block of
    the Hessian. Coordinate descent, ``iters`` rounds of mean then each scale. Returns (alphas, mu).
    """
    mf = m.to(x.dtype)
    Bm = [B * mf for B in Bs]
    SBm = [b @ S for b in Bm]  # (rows, cols) each
    den_mu = ((mf @ S) * mf).sum(1)
    den_a = [(sb * b).sum(1) for sb, b in zip(SBm, Bm)]
    alphas = list(alphas)
    for _ in range(iters):
        fit = sum(a[:, None] * b for a, b in zip(alphas, Bm))
        mu = _ratio((((x * mf - fit) @ S) * mf).sum(1), den_mu, mu)
        for k in range(len(alphas)):
            rest = sum(a[:, None] * b for j, (a, b) in enumerate(zip(alphas, Bm)) if j != k)
            target = (x - mu[:, None]) * mf - rest
            alphas[k] = _ratio((SBm[k] * target).sum(1), den_a[k], alphas[k])
    return alphas, mu


# ----------------------------------------------------------------------------- ARB-RC (row x column scales)

def _row_fit(t: Tensor, pattern: Tensor) -> Tensor:
    """Per-row least-squares scale of ``pattern`` (0 off the group) to ``t``: (rows,)."""
    return _ratio((pattern * t).sum(1), (pattern * pattern).sum(1))


def _col_fit(t: Tensor, pattern: Tensor) -> Tensor:
    """Per-column least-squares scale of ``pattern`` to ``t``: (cols,)."""
    return _ratio((pattern * t).sum(0), (pattern * pattern).sum(0))


def _rc_init(x: Tensor, mf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One row-column binarization: ``alpha_r = mean |x|`` per row, ``alpha_c = mean |x| / alpha_r`` per column."""
    ar = (x.abs() * mf).sum(1) / mf.sum(1).clamp(min=1)
    ok = mf * (ar > 0).to(x.dtype)[:, None]  # rows with a zero scale carry no column information
    ac = (x.abs() / torch.where(ar > 0, ar, 1.0)[:, None] * ok).sum(0) / ok.sum(0).clamp(min=1)
    return sign_pm1(x), ar, ac


def rc_order1(x: Tensor, m: Tensor, iters: int) -> tuple[Tensor, Tensor, Tensor]:
    """ARB-RC on the group ``m``: returns (B +-1, alpha_r (rows,), alpha_c (cols,)); ``B = sign(x)`` throughout."""
    mf = m.to(x.dtype)
    B, ar, ac = _rc_init(x, mf)
    xm, Bm = x * mf, B * mf
    for _ in range(iters):
        ar = _row_fit(xm, ac[None, :] * Bm)
        ac = _col_fit(xm, ar[:, None] * Bm)
    return B, ar, ac


def rc_order2(x: Tensor, m: Tensor, iters: int) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """ARB-RC at order 2: returns (B1, B2, (alpha_r1, alpha_c1, alpha_r2, alpha_c2))."""
    mf = m.to(x.dtype)
    xm = x * mf
    B1, ar1, ac1 = _rc_init(x, mf)
    B2, ar2, ac2 = _rc_init(x - ar1[:, None] * ac1[None, :] * B1, mf)
    for _ in range(iters):
        t = xm - ar2[:, None] * ac2[None, :] * B2 * mf  # what the first pass must fit
        ar1 = _row_fit(t, ac1[None, :] * B1 * mf)
        ac1 = _col_fit(t, ar1[:, None] * B1 * mf)
        t = xm - ar1[:, None] * ac1[None, :] * B1 * mf
        ar2 = _row_fit(t, ac2[None, :] * B2 * mf)
        ac2 = _col_fit(t, ar2[:, None] * B2 * mf)
        B1, B2 = _best_pair(x, ar1[:, None] * ac1[None, :], ar2[:, None] * ac2[None, :])
    return B1, B2, (ar1, ac1, ar2, ac2)


# ----------------------------------------------------------------------------- one block

@dataclass
class ArbCode:
    """One block's ARB-LLM code, unpacked (see :func:`arb_values`).

    Attributes:
        s1, s2: (rows, b) bool sign planes (``s2`` False off the salient columns).
        salient: (b,) bool salient-column flags.
        sparse: (rows, b) bool, True for the non-salient entries of the sparse group.
        scales: (1, 4, rows) row scales; ``means`` (1, 3, rows) or None; ``col_scales`` (2, b) or None.
    """

    s1: Tensor
    s2: Tensor
    salient: Tensor
    sparse: Tensor
    scales: Tensor
    means: Optional[Tensor]
    col_scales: Optional[Tensor]

    def decode(self) -> Tensor:
        """The block's dequantized weights (rows, b), by the checkpoint's own decoder."""
        return arb_values(self.s1, self.salient, self.sparse, self.s2, self.scales, self.means, self.col_scales,
                          self.s1.shape[1])


def encode_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, sal: Tensor, cfg: ArbConfig,
                  S: Optional[Tensor] = None) -> ArbCode:
    """The block's code from its three (rows, b) masks; ``S`` (b, b) the Hessian block (ARB-X only)."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    cols = sal[0] if sal.shape[0] else torch.zeros(Wb.shape[1], dtype=torch.bool, device=Wb.device)
    if cfg.variant == "rc":
        Bc, arc, acc = rc_order1(Wb, conc, cfg.iters)
        Bs, ars, acs = rc_order1(Wb, sparse, cfg.iters)
        B1, B2, (ar1, ac1, ar2, ac2) = rc_order2(Wb, sal, cfg.iters)
        scales = torch.stack([arc, ars, ar1, ar2])
        col_scales = round_to_stored(torch.stack([torch.where(cols, ac1, acc), torch.where(cols, ac2, acs)]), sd)
        means = None
    else:
        groups = []
        for mask in (conc, sparse):
            B, a, mu = arb_order1(Wb, mask, cfg.iters)
            if cfg.variant == "x":
                (a,), mu = arb_x_refit(Wb, mask, S, [B], [a], mu, cfg.x_iters)
            groups.append((B, a, mu))
        B1, B2, a1, a2, mu = arb_order2(Wb, sal, cfg.iters)
        if cfg.variant == "x":
            (a1, a2), mu = arb_x_refit(Wb, sal, S, [B1, B2], [a1, a2], mu, cfg.x_iters)
        (Bc, arc, muc), (Bs, ars, mus) = groups
        scales = torch.stack([arc, ars, a1, a2])
        means = round_to_stored(torch.stack([muc, mus, mu]), sd).unsqueeze(0)
        col_scales = None
    s1 = torch.where(sal, B1 > 0, torch.where(sparse, Bs > 0, Bc > 0))
    return ArbCode(s1=s1, s2=(B2 > 0) & sal, salient=cols, sparse=sparse.clone(),
                   scales=round_to_stored(scales, sd).unsqueeze(0), means=means, col_scales=col_scales)


def arb_block(Wb: Tensor, Ub: Tensor, cfg: ArbConfig, S: Optional[Tensor] = None) -> tuple[ArbCode, Tensor, float]:
    """Partition one block as BiLLM does, then binarize it the ARB way.

    Args:
        Wb: (rows, b) compensated weights of the block.
        Ub: (b, b) the block's part of U = chol(H^-1).
        cfg: options.
        S: (b, b) the block of the undamped Hessian (ARB-X).

    Returns:
        (the block's code, salient column indices (k,) in the block, break point).
    """
    Sal = salience(Wb, Ub, cfg.salient_metric)  # (rows, b)
    M = Sal if cfg.search_domain == SearchDomain.SALIENCE else Wb
    found = search_salient_columns(M, Sal.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols, order=2,
                                   centred=True)
    smask = found.mask(Wb.shape[1])  # (b,)
    brk = search_break_point(M, smask, break_candidates(M, smask, "quantile", cfg.n_break_candidates), order=1,
                             centred=True)
    code = encode_groups(Wb, *split_masks(M, smask, brk.value), cfg, S)
    return code, found.columns, brk.value


def stored_arb(codes: list[ArbCode], shape: tuple[int, int], cfg: ArbConfig) -> StoredWeight:
    """Join the blocks' codes into the packed stored form of the whole weight."""
    cat = lambda name: torch.cat([getattr(c, name) for c in codes], dim=-1)  # noqa: E731  along columns
    salient = cat("salient")
    rc = cfg.variant == "rc"
    meta = {"blocksize": cfg.blocksize, "n_salient": int(salient.sum()), "rc": rc, "scale_dtype": cfg.scale_dtype}
    tensors = arb_pack(cat("s1"), salient, cat("sparse"), cat("s2"), torch.cat([c.scales for c in codes]),
                       None if rc else torch.cat([c.means for c in codes]), cat("col_scales") if rc else None, meta)
    return StoredWeight("arb", tuple(shape), meta, tensors)


@register_method(ArbConfig)
def arb_quantize_weight(W: Tensor, H: Tensor, cfg: ArbConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """ARB-LLM-quantize ``W`` (rows, cols) with Hessian ``H`` (cols, cols); simulated weights and stored form."""
    W = W.to(torch.float32)  # the quantizer's own copy (the registry's contract): compensated in place
    S_full = H.to(device=W.device, dtype=torch.float32) if cfg.variant == "x" else None  # (cols, cols), ARB-X only
    prep = prepare_hessian(H, W, cfg.percdamp, release=S_full is None)
    salient: list[list[int]] = []
    breaks: list[float] = []
    codes: list[ArbCode] = []

    def quantize_block(Wb: Tensor, Ub: Tensor, start: int) -> Tensor:
        S = None if S_full is None else S_full[start:start + Wb.shape[1], start:start + Wb.shape[1]]
        code, cols, p = arb_block(Wb, Ub, cfg, S)
        salient.append(sorted(int(c) + start for c in cols))
        breaks.append(p)
        codes.append(code)
        return code.decode()

    Q = obc_quantize(W, prep.U, cfg.blocksize, quantize_block, times)
    return WeightResult(q=Q, stored=stored_arb(codes, tuple(W.shape), cfg), info={
        "salient_cols": sum(len(s) for s in salient), "salient_columns": salient, "break_points": breaks,
        "dead_cols": int(prep.dead.sum()), "percdamp_used": prep.percdamp,
    })
