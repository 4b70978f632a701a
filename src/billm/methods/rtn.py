"""Round-to-nearest with asymmetric min-max ranges (the GPTQ paper's baseline)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, RTNConfig
from ..packing.formats import StoredWeight, grid_index, grid_pack, grid_values, round_to_stored, smallest_positive
from .obc import OBCTimes
from .registry import WeightResult, register_method


def minmax_params(w: Tensor, bits: int, scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric (scale, zero) for ``w`` (rows, cols); the range always contains 0.

    Args:
        w: (rows, cols).
        bits: grid width.
        scale_dtype: round the scale to this dtype before the zero point is derived from it.

    Returns:
        scale (rows, 1) and integer-valued zero point (rows, 1) in [0, 2**bits - 1].
    """
    return range_params(w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values, bits, scale_dtype)


def range_params(lo: Tensor, hi: Tensor, bits: int, scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """(scale, zero) of the ``bits``-bit asymmetric grid spanning [lo, hi] widened to contain 0; any shape."""
    maxq = 2**bits - 1
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    if scale_dtype is not None:
        scale = round_to_stored(scale, scale_dtype).clamp(min=smallest_positive(scale_dtype))
    zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
    return scale, zero


def grid_codes(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes (as floats) of ``w`` on the grid ``scale * (q - zero)``, q in [0, 2**bits - 1]."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize_minmax(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Dequantized round-to-nearest of ``w`` with the given (broadcastable) scale and zero."""
    return grid_values(grid_codes(w, scale, zero, bits), scale, zero)


def rtn_codes(W: Tensor, bits: int, groupsize: int = -1,
              scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """RTN codes of ``W`` (rows, cols): (codes (rows, cols), scales (rows, G), zeros (rows, G))."""
    gs = W.shape[1] if groupsize == -1 else groupsize
    codes, scales, zeros = torch.empty_like(W), [], []
    for st in range(0, W.shape[1], gs):
        g = W[:, st:st + gs]
        scale, zero = minmax_params(g, bits, scale_dtype)
        codes[:, st:st + gs] = grid_codes(g, scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)


def rtn(W: Tensor, bits: int, groupsize: int = -1, scale_dtype: Optional[torch.dtype] = None) -> Tensor:
    """RTN of ``W`` (rows, cols): one range per row, or per row and group of ``groupsize`` columns."""
    codes, scales, zeros = rtn_codes(W, bits, groupsize, scale_dtype)
    idx = grid_index(W.shape[1], -1 if groupsize >= W.shape[1] else groupsize, W.device)
    return grid_values(codes, scales[:, idx], zeros[:, idx])


def stored_grid(codes: Tensor, scales: Tensor, zeros: Tensor, bits: int, groupsize: int, scale_dtype: str,
                g_idx: Optional[Tensor] = None) -> StoredWeight:
    """The packed stored form of integer-grid codes (RTN, GPTQ)."""
    meta = {"bits": bits, "groupsize": groupsize, "g_idx": g_idx is not None, "scale_dtype": scale_dtype}
    tensors = grid_pack(codes.to(torch.int32), scales, zeros, g_idx, meta)
    return StoredWeight("grid", tuple(codes.shape), meta, tensors)


@register_method(RTNConfig)
def rtn_quantize_weight(W: Tensor, H: Optional[Tensor], cfg: RTNConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """RTN needs no Hessian (``H`` may be None)."""
    W = W.to(torch.float32)
    gs = -1 if cfg.groupsize >= W.shape[1] else cfg.groupsize
    codes, scales, zeros = rtn_codes(W, cfg.bits, gs, SCALE_DTYPES[cfg.scale_dtype])
    stored = stored_grid(codes, scales, zeros, cfg.bits, gs, cfg.scale_dtype)
    idx = grid_index(W.shape[1], gs, W.device)
    return WeightResult(q=grid_values(codes, scales[:, idx], zeros[:, idx]), stored=stored)
