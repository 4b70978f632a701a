"""Round-to-nearest with asymmetric min-max ranges (the GPTQ paper's baseline)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import RTNConfig
from .obc import OBCTimes
from .registry import WeightResult, register_method


def minmax_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric (scale, zero) for ``w`` (rows, cols); the range always contains 0.

    Returns:
        scale (rows, 1) and integer-valued zero point (rows, 1).
    """
    maxq = 2**bits - 1
    lo = torch.clamp(w.min(dim=1, keepdim=True).values, max=0)
    hi = torch.clamp(w.max(dim=1, keepdim=True).values, min=0)
    flat = (lo == 0) & (hi == 0)
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    return scale, zero


def quantize_minmax(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Dequantized round-to-nearest of ``w`` with the given (broadcastable) scale and zero."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def rtn(W: Tensor, bits: int, groupsize: int = -1) -> Tensor:
    """RTN of ``W`` (rows, cols): one range per row, or per row and group of ``groupsize`` columns."""
    if groupsize == -1 or groupsize >= W.shape[1]:
        return quantize_minmax(W, *minmax_params(W, bits), bits)
    out = torch.empty_like(W)
    for st in range(0, W.shape[1], groupsize):
        g = W[:, st:st + groupsize]
        out[:, st:st + groupsize] = quantize_minmax(g, *minmax_params(g, bits), bits)
    return out


@register_method("rtn")
def rtn_quantize_weight(W: Tensor, H: Optional[Tensor], cfg: RTNConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """RTN needs no Hessian (``H`` may be None)."""
    return WeightResult(q=rtn(W.to(torch.float32), cfg.bits, cfg.groupsize), weight_bits=float(cfg.bits))
