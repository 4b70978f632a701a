"""GPTQ: quantize column by column inside each block, compensating the rest of the block at once.

The inner loop takes any per-column quantizer, so plain sign binarization with compensation
(``sign``) reuses it; the OBC driver propagates each block's scaled error to later blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, option
from ..errors import QuantizationError
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method
from .rtn import GridConfig, grid_codes, grid_values, minmax_params, stored_grid


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class GPTQConfig(GridConfig):
    """GPTQ: column-by-column rounding with Hessian-based error compensation (lazy block updates)."""

    method: ClassVar[str] = "gptq"
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**GridConfig.abbrev, "a": "act_order"}

    act_order: bool = option(False, "quantize columns in order of descending Hessian diagonal")



# ----------------------------------------------------------------------------- quantizer


ColumnQuantizer = Callable[[int, Tensor], Tensor]
"""``(absolute column index, current column w (rows,)) -> dequantized column (rows,)``."""


def gptq_block(Wb: Tensor, Ub: Tensor, start: int, quant_col: ColumnQuantizer) -> tuple[Tensor, Tensor]:
    """GPTQ inside one block: returns (Qb, Eb), Eb the scaled errors ``(w - q) / U_jj`` per column.

    Args:
        Wb: (rows, b) the block (a copy; updated as columns are quantized).
        Ub: (b, b) the block of U = chol(H^-1), upper.
        start: absolute index of the block's first column.
    """
    b = Wb.shape[1]
    cols, diag, urows = Wb.unbind(1), Ub.diagonal().unbind(0), Ub.unbind(0)  # views, made once per block
    qs: list[Tensor] = []
    es: list[Tensor] = []
    for j in range(b):
        w = cols[j]  # (rows,) a view: it carries the updates from the columns before it
        q = quant_col(start + j, w)
        e = (w - q) / diag[j]
        if j + 1 < b:
            Wb[:, j + 1:].sub_(torch.outer(e, urows[j][j + 1:]))  # (rows, b-j-1)
        qs.append(q)
        es.append(e)
    return torch.stack(qs, 1), torch.stack(es, 1)


@dataclass
class GPTQRun:
    """Output of :func:`gptq_weight`.

    Attributes:
        q: (rows, cols) dequantized weights, original column order.
        percdamp: damping used.
        perm: (cols,) the act-order permutation (quantized position -> original column), or None.
        quantizer: the per-column quantizer the factory made (it may have recorded its codes).
    """

    q: Tensor
    percdamp: float
    perm: Optional[Tensor]
    quantizer: ColumnQuantizer


def gptq_weight(W: Tensor, H: Tensor, blocksize: int, percdamp: float, quant_col_factory,
                act_order: bool = False, times: Optional[OBCTimes] = None, release: bool = False) -> GPTQRun:
    """Run GPTQ over ``W`` (rows, cols) with the per-column quantizer made by ``quant_col_factory(W)``.

    ``W`` is modified in place (pass a copy to keep it). The factory is called as ``quant_col_factory(W, U)`` with the (permuted, dead-column-zeroed)
    weights before any compensation, e.g. to fix per-row scales, and ``U = chol(H^-1)`` (upper) in the
    same order; column indices the quantizer receives are positions in that (permuted) order. ``release``: the caller
    reads ``H`` no more (:func:`~billm.methods.obc.prepare_hessian`; a factory that reads it must leave this off).
    """
    W = W.to(torch.float32)  # the caller's own copy: compensated in place
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    prep = prepare_hessian(H, W, percdamp, release=release and perm is None)  # a permuted H is this function's own
    quant_col = quant_col_factory(W, prep.U)
    Q = obc_quantize(W, prep.U, blocksize, lambda Wb, Ub, st: gptq_block(Wb, Ub, st, quant_col), times)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQRun(q=Q, percdamp=prep.percdamp, perm=perm, quantizer=quant_col)


Calibrate = Callable[[Tensor, int, int], tuple[Tensor, Tensor]]
"""``(group weights (rows, n), bits, first column) -> (scale, zero)`` each (rows, 1)."""


class GridColumns:
    """Per-column integer-grid quantizer that records its codes, scales and zeros.

    Ranges are per row (``groupsize == -1``, fixed from the weights before compensation) or per
    row and group, set from the compensated weights when the group's first column comes up.

    Args:
        W0: (rows, cols) the weights the OBC loop compensates in place.
        bits: grid width of every group, unless ``group_bits`` is given.
        groupsize: columns per group, or -1.
        scale_dtype: dtype scales are rounded to before use.
        group_bits: optional width of each group (mixed precision).
        calibrate: optional choice of a group's (scale, zero); min-max by default.
    """

    def __init__(self, W0: Tensor, bits: int, groupsize: int, scale_dtype: Optional[torch.dtype],
                 group_bits: Optional[list[int]] = None, calibrate: Optional[Calibrate] = None) -> None:
        self.W, self.groupsize, self.scale_dtype = W0, groupsize, scale_dtype
        n_groups = 1 if groupsize == -1 else -(-W0.shape[1] // groupsize)
        self.group_bits = list(group_bits) if group_bits is not None else [bits] * n_groups
        if not 1 <= min(self.group_bits) <= max(self.group_bits) <= 8:
            raise QuantizationError(f"grid widths must be in 1..8 bits, got {sorted(set(self.group_bits))}")
        self.calibrate = calibrate or (lambda w, b, col: minmax_params(w, b, scale_dtype))
        self.codes = torch.zeros(W0.shape, dtype=torch.uint8, device=W0.device)  # (rows, cols): every width fits 8 bits
        self.scales: list[Tensor] = []  # per group (rows, 1)
        self.zeros: list[Tensor] = []
        if groupsize == -1:
            self._new_group(W0, 0)

    def _new_group(self, w: Tensor, col: int) -> None:
        self.bits = self.group_bits[len(self.scales)]
        scale, zero = self.calibrate(w, self.bits, col)
        self.scales.append(scale)
        self.zeros.append(zero)
        self._grid = (scale[:, 0], zero[:, 0])  # (rows,) each, for the columns of this group

    def __call__(self, col: int, w: Tensor) -> Tensor:
        if self.groupsize != -1 and col % self.groupsize == 0:
            self._new_group(self.W[:, col:col + self.groupsize], col)  # self.W is compensated in place by the OBC loop
        scale, zero = self._grid
        code = grid_codes(w, scale, zero, self.bits)  # (rows,)
        self.codes[:, col] = code
        return grid_values(code, scale, zero)


@register_method(GPTQConfig)
def gptq_quantize_weight(W: Tensor, H: Tensor, cfg: GPTQConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """GPTQ at ``cfg.bits`` bits; the codes are kept for the checkpoint."""
    gs = -1 if cfg.groupsize >= W.shape[1] else cfg.groupsize
    sd = SCALE_DTYPES[cfg.scale_dtype]
    run = gptq_weight(W, H, cfg.blocksize, cfg.percdamp, lambda W0, U: GridColumns(W0, cfg.bits, gs, sd),
                      cfg.act_order, times, release=True)
    grid: GridColumns = run.quantizer  # type: ignore[assignment]
    codes, g_idx = grid.codes, None
    if run.perm is not None:
        inv = torch.argsort(run.perm)
        codes = codes[:, inv]
        if gs != -1:
            g_idx = (inv // gs).to(torch.int32)  # original column -> group of its quantized position
    stored = stored_grid(codes, torch.cat(grid.scales, 1), torch.cat(grid.zeros, 1), cfg.bits, gs, cfg.scale_dtype, g_idx)
    return WeightResult(q=run.q, info={"percdamp_used": run.percdamp}, stored=stored)
