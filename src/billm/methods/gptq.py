"""GPTQ: quantize column by column inside each block, compensating the rest of the block at once.

The inner loop takes any per-column quantizer, so plain sign binarization with compensation
(``sign``) reuses it; the OBC driver propagates each block's scaled error to later blocks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..config import GPTQConfig
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method
from .rtn import minmax_params, quantize_minmax

ColumnQuantizer = Callable[[int, Tensor], Tensor]
"""``(absolute column index, current column w (rows,)) -> dequantized column (rows,)``."""


def gptq_block(Wb: Tensor, Ub: Tensor, start: int, quant_col: ColumnQuantizer) -> tuple[Tensor, Tensor]:
    """GPTQ inside one block: returns (Qb, Eb), Eb the scaled errors ``(w - q) / U_jj`` per column.

    Args:
        Wb: (rows, b) the block (a copy; updated as columns are quantized).
        Ub: (b, b) the block of U = chol(H^-1), upper.
        start: absolute index of the block's first column.
    """
    Q = torch.zeros_like(Wb)
    E = torch.zeros_like(Wb)
    for j in range(Wb.shape[1]):
        w = Wb[:, j]
        q = quant_col(start + j, w)
        e = (w - q) / Ub[j, j]
        Wb[:, j + 1:] -= e.unsqueeze(1) * Ub[j, j + 1:].unsqueeze(0)  # (rows, b-j-1)
        Q[:, j], E[:, j] = q, e
    return Q, E


def gptq_weight(W: Tensor, H: Tensor, blocksize: int, percdamp: float, quant_col_factory,
                act_order: bool = False, times: Optional[OBCTimes] = None) -> tuple[Tensor, float]:
    """Run GPTQ over ``W`` (rows, cols) with the per-column quantizer made by ``quant_col_factory(W)``.

    The factory sees the (permuted, dead-column-zeroed) weights before any compensation, e.g. to
    fix per-row scales. Returns (Q in the original column order, damping used).
    """
    W = W.to(torch.float32).clone()
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    prep = prepare_hessian(H, W, percdamp)
    quant_col = quant_col_factory(W)
    Q = obc_quantize(W, prep.U, blocksize, lambda Wb, Ub, st: gptq_block(Wb, Ub, st, quant_col), times)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, prep.percdamp


def minmax_columns(bits: int, groupsize: int) -> Callable[[Tensor], ColumnQuantizer]:
    """Per-column quantizer factory: min-max ranges per row (or per group, set when a group starts)."""

    def factory(W0: Tensor) -> ColumnQuantizer:
        state: dict[str, Tensor] = {}
        if groupsize == -1:
            state["scale"], state["zero"] = minmax_params(W0, bits)

        def quant(col: int, w: Tensor) -> Tensor:
            if groupsize != -1 and col % groupsize == 0:
                state["scale"], state["zero"] = minmax_params(state["W"][:, col:col + groupsize], bits)
            return quantize_minmax(w.unsqueeze(1), state["scale"], state["zero"], bits).squeeze(1)

        state["W"] = W0  # compensated in place by the OBC loop: groups see the updated weights
        return quant

    return factory


@register_method("gptq")
def gptq_quantize_weight(W: Tensor, H: Tensor, cfg: GPTQConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """GPTQ at ``cfg.bits`` bits."""
    Q, damp = gptq_weight(W, H, cfg.blocksize, cfg.percdamp, minmax_columns(cfg.bits, cfg.groupsize),
                          cfg.act_order, times)
    return WeightResult(q=Q, weight_bits=float(cfg.bits), info={"percdamp_used": damp})
