"""BiLLM on one weight matrix: salient columns + split non-salient weights, inside the OBC loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, BiLLMConfig, SalientMetric, SearchDomain
from ..packing.formats import StoredWeight, billm_pack, billm_values, pm1, round_to_stored
from .binarize import binarize_params
from .gptq import gptq_block
from .obc import OBCTimes, damped_hessian, obc_quantize, prepare_hessian
from .refine import refine_group, refit_scales
from .registry import WeightResult, register_method
from .search import (break_candidates, search_break_output, search_break_point, search_salient_columns,
                     search_salient_output, search_sparse_columns_output, split_masks)


def salience(Wb: Tensor, Ub: Tensor, metric: SalientMetric) -> Tensor:
    """Per-weight salience of a block: ``w^2 / U_jj^2`` (hessian) or ``|w|`` (magnitude); (rows, b)."""
    if metric == SalientMetric.HESSIAN:
        return Wb**2 / torch.diag(Ub).unsqueeze(0) ** 2
    return Wb.abs()


@dataclass
class BlockCode:
    """One block's BiLLM code, unpacked: what the checkpoint stores for it.

    Attributes:
        s1: (rows, b) bool first sign plane (every entry).
        salient: (b,) bool salient-column flags.
        sparse: (rows, b) bool, True for the non-salient entries of the sparse group.
        s2: (rows, b) bool second plane (meaningful on salient columns) or None for order 1.
        scales, means: (1, 2 + order, rows) float32 per group and pass (``means`` None when not
            centred); slots as :data:`billm.packing.formats.BILLM_SLOTS`.
    """

    s1: Tensor
    salient: Tensor
    sparse: Tensor
    s2: Optional[Tensor]
    scales: Tensor
    means: Optional[Tensor]

    def values(self) -> Tensor:
        """The block's dequantized weights (rows, b), by the checkpoint's own decoder."""
        return billm_values(self.s1, self.salient, self.sparse, self.s2, self.scales, self.means, self.s1.shape[1])


def billm_block(Wb: Tensor, Ub: Tensor, cfg: BiLLMConfig) -> tuple[Tensor, BlockCode, Tensor, float]:
    """Binarize one block the BiLLM way.

    Args:
        Wb: (rows, b) compensated weights of the block.
        Ub: (b, b) the block's part of U = chol(H^-1).
        cfg: options.

    Returns:
        (Qb (rows, b), the block's code, salient column indices (k,) in the block, break point).
    """
    S = salience(Wb, Ub, cfg.salient_metric)  # (rows, b)
    if cfg.search_domain == SearchDomain.OUTPUT:
        return _billm_block_output(Wb, Ub, S, cfg)
    M = S if cfg.search_domain == SearchDomain.SALIENCE else Wb
    sal = search_salient_columns(M, S.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols,
                                 order=cfg.salient_search_order, centred=cfg.centred)
    smask = sal.mask(Wb.shape[1])  # (b,)
    if cfg.split == "column":
        code = encode_groups(Wb, *column_masks(M, smask, sparse_columns(M, smask, cfg.centred)), cfg)
        return code.values(), code, sal.columns, float("nan")
    cands = break_candidates(M, smask, cfg.break_grid.value, cfg.n_break_candidates)
    brk = search_break_point(M, smask, cands, order=1, centred=cfg.centred)
    code = encode_groups(Wb, *split_masks(M, smask, brk.value), cfg)
    return code.values(), code, sal.columns, brk.value


def _billm_block_output(Wb: Tensor, Ub: Tensor, S: Tensor, cfg: BiLLMConfig) -> tuple[Tensor, BlockCode, Tensor, float]:
    """:func:`billm_block` with both searches scored by the block's output error under H."""
    sal = search_salient_output(Wb, Ub, S.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols,
                                cfg.salient_search_order, cfg.centred)
    smask = sal.mask(Wb.shape[1])
    if cfg.split == "column":
        sparse = search_sparse_columns_output(Wb, Ub, smask, cfg.salient_order, cfg.centred)
        code = encode_groups(Wb, *column_masks(Wb, smask, sparse), cfg)
        return code.values(), code, sal.columns, float("nan")
    cands = break_candidates(Wb, smask, cfg.break_grid.value, cfg.n_break_candidates)
    brk = search_break_output(Wb, Ub, smask, cands, cfg.salient_order, cfg.centred)
    code = encode_groups(Wb, *split_masks(Wb, smask, brk.value), cfg)
    return code.values(), code, sal.columns, brk.value


def sparse_columns(M: Tensor, salient: Tensor, centred: bool) -> Tensor:
    """(cols,) bool: the non-salient columns of the sparse group when the split is per column.

    The break point's search, per column: the non-salient columns ranked by mean |M|, the top j
    form the sparse group and the rest the concentrated one, each binarized at order 1, and the j
    with the least squared error of M wins (j = 0 allowed: one group).
    """
    non = (~salient).nonzero().squeeze(1)  # (n,)
    Mn = M[:, non]  # (rows, n)
    found = search_salient_columns(Mn, Mn.abs().mean(dim=0), 0, Mn.shape[1] - 1, order=1, centred=centred)
    out = torch.zeros_like(salient)
    out[non[found.columns]] = True
    return out


def column_masks(M: Tensor, salient: Tensor, sparse_cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(concentrated, sparse, salient) boolean (rows, cols) masks from per-column groups."""
    rows = M.shape[0]
    sal = salient.unsqueeze(0).expand(rows, -1)
    sparse = sparse_cols.unsqueeze(0).expand(rows, -1) & ~sal
    return ~sal & ~sparse, sparse.clone(), sal.clone()


def encode_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, salient: Tensor, cfg: BiLLMConfig) -> BlockCode:
    """The block's code from its three (rows, b) masks: order 1 on each split group, residual on the salient."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    groups = []
    for mask, order in ((conc, 1), (sparse, 1), (salient, cfg.salient_order)):
        signs, alphas, mus = binarize_params(Wb, mask, order, cfg.centred, sd)  # (order, rows, b), (order, rows) x2
        if cfg.refine_rounds and (order > 1 or cfg.centred):  # plain order 1: mean|x| is already the LS scale
            signs, alphas, mus = refine_group(Wb, mask, signs, cfg.centred, cfg.refine_rounds, sd)
        groups.append((signs, alphas, mus))
    (sc, ac, mc), (ss, as_, ms), (sh, ah, mh) = groups
    cols = salient[0] if salient.shape[0] else torch.zeros(Wb.shape[1], dtype=torch.bool, device=Wb.device)
    s1 = torch.where(salient, sh[0], torch.where(sparse, ss[0], sc[0]))
    s2 = sh[1] & salient if cfg.salient_order == 2 else None
    scales = torch.cat([ac, as_, ah]).unsqueeze(0)  # (1, 2 + order, rows)
    means = torch.cat([mc, ms, mh]).unsqueeze(0) if cfg.centred else None
    return BlockCode(s1=s1, salient=cols, sparse=sparse.clone(), s2=s2, scales=scales, means=means)


def intra_block_columns(Wb: Tensor, Ub: Tensor, code: BlockCode, start: int,
                        salient_cols: Sequence[int]) -> tuple[Tensor, Tensor]:
    """GPTQ inside a BiLLM block: groups, scales and means fixed, signs chosen column by column.

    Each column's signs are taken against the column as compensated so far (greedy residual
    order), its error is pushed onto the block's remaining columns, and ``code``'s sign planes are
    overwritten with the choices. ``salient_cols`` are the block's salient columns (absolute
    indices, on the host: the columns of ``code.salient``), so no column waits on the device.
    Returns (Qb, Eb) for :func:`~billm.methods.obc.obc_quantize`.
    """
    sc = code.scales[0].unbind(0)  # slots x (rows,)
    centred = code.means is not None
    mn = code.means[0].unbind(0) if centred else ()
    salient = frozenset(salient_cols)  # each column takes only its own branch
    sparse = code.sparse.unbind(1)  # b x (rows,) column views
    s2_plane = code.s2 is not None  # second sign plane (salient order 2): only on salient columns

    # The decoder's operations (billm_values) on one column, in its order: the same bits, the same values.
    def quant(col: int, w: Tensor) -> Tensor:
        j = col - start
        if col in salient:
            s1 = (w - mn[2] if centred else w) >= 0
            code.s1[:, j] = s1
            q = sc[2] * pm1(s1)
            if centred:
                q = q + mn[2]
            if s2_plane:
                s2 = (w - q - mn[3] if centred else w - q) >= 0
                code.s2[:, j] = s2
                q2 = sc[3] * pm1(s2)
                q = q + (q2 + mn[3] if centred else q2)
            return q
        # Not salient: the sparse or concentrated group's scale (and mean); the second plane stays 0,
        # where the decoder adds 0 * -1 = -0.0 (+ 0.0 when centred).
        g = sparse[j]
        mg = torch.where(g, mn[1], mn[0]) if centred else None  # the column's group means
        s1 = (w - mg if centred else w) >= 0
        code.s1[:, j] = s1
        q = torch.where(g, sc[1], sc[0]) * pm1(s1)
        if centred:
            q = q + mg
        if s2_plane:
            q = q + (0.0 if centred else -0.0)
        return q

    return gptq_block(Wb, Ub, start, quant)


def refit_codes(W: Tensor, H: Tensor, codes: list[BlockCode], cfg: BiLLMConfig) -> None:
    """Re-solve every block's scales (and means) for the least output error under ``H``; in place."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    slots = 2 + cfg.salient_order
    pats = []
    for c in codes:
        sal = c.salient.unsqueeze(0).expand_as(c.s1)
        masks = [~sal & ~c.sparse, ~sal & c.sparse, sal] + ([sal] if cfg.salient_order == 2 else [])
        signs = [c.s1, c.s1, c.s1] + ([c.s2] if cfg.salient_order == 2 else [])
        p = [pm1(s) * m for s, m in zip(signs, masks)]
        if cfg.centred:
            p += [m.to(W.dtype) for m in masks]
        pats.append(torch.stack(p))  # (S, rows, b)
    patterns = torch.cat(pats, dim=2)  # (S, rows, cols)
    block_of = torch.cat([torch.full((c.s1.shape[1],), i, device=W.device) for i, c in enumerate(codes)])
    fit = refit_scales(W, H, patterns, block_of, len(codes))  # (nb, S, rows)
    for i, c in enumerate(codes):
        c.scales = round_to_stored(fit[i:i + 1, :slots], sd)
        if cfg.centred:
            c.means = round_to_stored(fit[i:i + 1, slots:], sd)


def binarize_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, salient: Tensor, cfg: BiLLMConfig) -> Tensor:
    """The block's estimate (rows, b) from its three masks (see :func:`encode_groups`)."""
    return encode_groups(Wb, conc, sparse, salient, cfg).values()


def stored_billm(codes: list[BlockCode], shape: tuple[int, int], cfg: BiLLMConfig) -> StoredWeight:
    """Join the blocks' codes into the packed stored form of the whole weight."""
    cat = lambda name: torch.cat([getattr(c, name) for c in codes], dim=-1)  # noqa: E731  along columns
    salient = cat("salient")
    meta = {"blocksize": cfg.blocksize, "salient_order": cfg.salient_order, "centred": cfg.centred,
            "n_salient": int(salient.sum()), "scale_dtype": cfg.scale_dtype}
    if cfg.split != "weight":  # recorded only when used: earlier checkpoints' maps stay as they were
        meta["split"] = cfg.split
    tensors = billm_pack(cat("s1"), salient, cat("sparse"), cat("s2") if cfg.salient_order == 2 else None,
                         torch.cat([c.scales for c in codes]), torch.cat([c.means for c in codes]) if cfg.centred else None,
                         meta)
    return StoredWeight("billm", tuple(shape), meta, tensors)


@register_method(BiLLMConfig)
def billm_quantize_weight(W: Tensor, H: Tensor, cfg: BiLLMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """BiLLM-quantize ``W`` (rows, cols) with Hessian ``H`` (cols, cols); simulated weights and stored form."""
    W = W.to(torch.float32).clone()
    prep = prepare_hessian(H, W, cfg.percdamp)
    W0 = W.clone() if cfg.refit else None  # the target of the output-error refit (dead columns zeroed)
    salient: list[list[int]] = []  # per block, salient column indices (absolute)
    breaks: list[float] = []
    codes: list[BlockCode] = []

    def quantize_block(Wb: Tensor, Ub: Tensor, start: int):
        Qb, code, cols_, p = billm_block(Wb, Ub, cfg)
        salient.append(sorted(c + start for c in cols_.tolist()))  # one host read a block
        breaks.append(p)
        codes.append(code)
        if cfg.intra_block:
            return intra_block_columns(Wb.clone(), Ub, code, start, salient[-1])
        return Qb

    Q = obc_quantize(W, prep.U, cfg.blocksize, quantize_block, times)
    if cfg.refit:
        refit_codes(W0, damped_hessian(H, prep.dead, prep.percdamp), codes, cfg)
        Q = torch.cat([c.values() for c in codes], dim=1)
    return WeightResult(q=Q, stored=stored_billm(codes, tuple(W.shape), cfg), info={
        "salient_cols": sum(len(s) for s in salient), "salient_columns": salient, "break_points": breaks,
        "dead_cols": int(prep.dead.sum()), "percdamp_used": prep.percdamp,
    })
