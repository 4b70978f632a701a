"""BiLLM on one weight matrix: salient columns + split non-salient weights, inside the OBC loop."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import BiLLMConfig, SalientMetric, SearchDomain
from .binarize import binarize
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method
from .search import break_candidates, search_break_point, search_salient_columns, split_masks


def salience(Wb: Tensor, Ub: Tensor, metric: SalientMetric) -> Tensor:
    """Per-weight salience of a block: ``w^2 / U_jj^2`` (hessian) or ``|w|`` (magnitude); (rows, b)."""
    if metric == SalientMetric.HESSIAN:
        return Wb**2 / torch.diag(Ub).unsqueeze(0) ** 2
    return Wb.abs()


def billm_block(Wb: Tensor, Ub: Tensor, cfg: BiLLMConfig) -> tuple[Tensor, Tensor, float]:
    """Binarize one block the BiLLM way.

    Args:
        Wb: (rows, b) compensated weights of the block.
        Ub: (b, b) the block's part of U = chol(H^-1).
        cfg: options.

    Returns:
        (Qb (rows, b), salient column indices (k,) in the block, break point).
    """
    S = salience(Wb, Ub, cfg.salient_metric)  # (rows, b)
    M = S if cfg.search_domain == SearchDomain.SALIENCE else Wb
    sal = search_salient_columns(M, S.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols,
                                 order=cfg.salient_search_order, centred=cfg.centred)
    smask = sal.mask(Wb.shape[1])  # (b,)
    cands = break_candidates(M, smask, cfg.break_grid.value, cfg.n_break_candidates)
    brk = search_break_point(M, smask, cands, order=1, centred=cfg.centred)
    return binarize_groups(Wb, *split_masks(M, smask, brk.value), cfg), sal.columns, brk.value


def binarize_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, salient: Tensor, cfg: BiLLMConfig) -> Tensor:
    """The block's estimate from its three (rows, b) masks: order 1 on each split group, residual on the salient."""
    return (binarize(Wb, conc, 1, cfg.centred) + binarize(Wb, sparse, 1, cfg.centred)
            + binarize(Wb, salient, cfg.salient_order, cfg.centred))


@register_method("billm")
def billm_quantize_weight(W: Tensor, H: Tensor, cfg: BiLLMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """BiLLM-quantize ``W`` (rows, cols) with Hessian ``H`` (cols, cols); returns simulated weights."""
    W = W.to(torch.float32).clone()
    prep = prepare_hessian(H, W, cfg.percdamp)
    salient: list[list[int]] = []  # per block, salient column indices (absolute)
    breaks: list[float] = []

    def quantize_block(Wb: Tensor, Ub: Tensor, start: int) -> Tensor:
        Qb, cols_, p = billm_block(Wb, Ub, cfg)
        salient.append(sorted(int(c) + start for c in cols_))
        breaks.append(p)
        return Qb

    Q = obc_quantize(W, prep.U, cfg.blocksize, quantize_block, times)
    cols = W.shape[1]
    n_sal = sum(len(s) for s in salient)
    bits = (cfg.salient_order * n_sal + (cols - n_sal)) / cols
    return WeightResult(q=Q, weight_bits=bits, info={
        "salient_cols": n_sal, "salient_columns": salient, "break_points": breaks,
        "dead_cols": int(prep.dead.sum()), "percdamp_used": prep.percdamp,
    })
