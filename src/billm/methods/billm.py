"""BiLLM on one weight matrix: salient columns + split non-salient weights, inside the OBC loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..config import BiLLMConfig, SalientMetric, SearchDomain
from ..packing.formats import SCALE_DTYPES, StoredWeight, billm_pack, billm_values
from .binarize import binarize_params
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method
from .search import break_candidates, search_break_point, search_salient_columns, split_masks


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
    M = S if cfg.search_domain == SearchDomain.SALIENCE else Wb
    sal = search_salient_columns(M, S.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols,
                                 order=cfg.salient_search_order, centred=cfg.centred)
    smask = sal.mask(Wb.shape[1])  # (b,)
    cands = break_candidates(M, smask, cfg.break_grid.value, cfg.n_break_candidates)
    brk = search_break_point(M, smask, cands, order=1, centred=cfg.centred)
    code = encode_groups(Wb, *split_masks(M, smask, brk.value), cfg)
    return code.values(), code, sal.columns, brk.value


def encode_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, salient: Tensor, cfg: BiLLMConfig) -> BlockCode:
    """The block's code from its three (rows, b) masks: order 1 on each split group, residual on the salient."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    sc, ac, mc = binarize_params(Wb, conc, 1, cfg.centred, sd)  # signs (1, rows, b); scales (1, rows)
    ss, as_, ms = binarize_params(Wb, sparse, 1, cfg.centred, sd)
    sh, ah, mh = binarize_params(Wb, salient, cfg.salient_order, cfg.centred, sd)  # (order, rows, b), (order, rows)
    cols = salient[0] if salient.shape[0] else torch.zeros(Wb.shape[1], dtype=torch.bool, device=Wb.device)
    s1 = torch.where(salient, sh[0], torch.where(sparse, ss[0], sc[0]))
    s2 = sh[1] & salient if cfg.salient_order == 2 else None
    scales = torch.cat([ac, as_, ah]).unsqueeze(0)  # (1, 2 + order, rows)
    means = torch.cat([mc, ms, mh]).unsqueeze(0) if cfg.centred else None
    return BlockCode(s1=s1, salient=cols, sparse=sparse.clone(), s2=s2, scales=scales, means=means)


def binarize_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, salient: Tensor, cfg: BiLLMConfig) -> Tensor:
    """The block's estimate (rows, b) from its three masks (see :func:`encode_groups`)."""
    return encode_groups(Wb, conc, sparse, salient, cfg).values()


def stored_billm(codes: list[BlockCode], shape: tuple[int, int], cfg: BiLLMConfig) -> StoredWeight:
    """Join the blocks' codes into the packed stored form of the whole weight."""
    cat = lambda name: torch.cat([getattr(c, name) for c in codes], dim=-1)  # noqa: E731  along columns
    salient = cat("salient")
    meta = {"blocksize": cfg.blocksize, "salient_order": cfg.salient_order, "centred": cfg.centred,
            "n_salient": int(salient.sum()), "scale_dtype": cfg.scale_dtype}
    tensors = billm_pack(cat("s1"), salient, cat("sparse"), cat("s2") if cfg.salient_order == 2 else None,
                         torch.cat([c.scales for c in codes]), torch.cat([c.means for c in codes]) if cfg.centred else None,
                         meta)
    return StoredWeight("billm", tuple(shape), meta, {k: v.cpu() for k, v in tensors.items()})


@register_method("billm")
def billm_quantize_weight(W: Tensor, H: Tensor, cfg: BiLLMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """BiLLM-quantize ``W`` (rows, cols) with Hessian ``H`` (cols, cols); simulated weights and stored form."""
    W = W.to(torch.float32).clone()
    prep = prepare_hessian(H, W, cfg.percdamp)
    salient: list[list[int]] = []  # per block, salient column indices (absolute)
    breaks: list[float] = []
    codes: list[BlockCode] = []

    def quantize_block(Wb: Tensor, Ub: Tensor, start: int) -> Tensor:
        Qb, code, cols_, p = billm_block(Wb, Ub, cfg)
        salient.append(sorted(int(c) + start for c in cols_))
        breaks.append(p)
        codes.append(code)
        return Qb

    Q = obc_quantize(W, prep.U, cfg.blocksize, quantize_block, times)
    cols = W.shape[1]
    n_sal = sum(len(s) for s in salient)
    bits = (cfg.salient_order * n_sal + (cols - n_sal)) / cols
    return WeightResult(q=Q, weight_bits=bits, stored=stored_billm(codes, tuple(W.shape), cfg), info={
        "salient_cols": n_sal, "salient_columns": salient, "break_points": breaks,
        "dead_cols": int(prep.dead.sum()), "percdamp_used": prep.percdamp,
    })
