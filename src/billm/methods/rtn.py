"""Round-to-nearest with asymmetric min-max ranges (the GPTQ paper's baseline)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, QuantConfig, check, option
from ..kernels.bitpack import pack_codes, packed_len, unpack_codes
from ..kernels.layout import GridValues, Layout, grid_planes
from ..packing.formats import (FieldSpec, Format, Meta, Shape, StoredWeight, Tensors, per_column, register_format,
                               round_to_stored, scale_dtype, smallest_positive)
from .obc import OBCTimes
from .registry import WeightResult, register_method


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class GridConfig(QuantConfig):
    """Integer-grid methods: ``bits`` per weight, one min-max range per row or per group of columns."""

    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**QuantConfig.abbrev, "w": "bits", "g": "groupsize"}

    bits: int = option(4, "bits per weight (slim: the layer's average, groups use bits-1..bits+1)")
    groupsize: int = option(-1, "columns per scale group (-1: one range per row)")

    @property
    def storage_estimate(self) -> float:  # type: ignore[override]
        return self.bits + 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(1 <= self.bits <= 8, f"bits must be in 1..8, got {self.bits}")
        check(self.groupsize == -1 or self.groupsize >= 1, f"groupsize must be -1 or >= 1, got {self.groupsize}")


@dataclass(frozen=True)
class RTNConfig(GridConfig):
    """Round-to-nearest, asymmetric min-max, per output channel or per group of ``groupsize`` columns."""

    method: ClassVar[str] = "rtn"
    uses_hessian: ClassVar[bool] = False



# ----------------------------------------------------------------------------- stored format: grid (RTN / GPTQ)

def grid_values(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (code - zero)`` in float32; scale and zero broadcast against codes."""
    return scale * (codes.to(torch.float32) - zero.to(torch.float32))


def grid_groups(c: int, gs: int) -> int:
    return 1 if gs == -1 else math.ceil(c / gs)


def grid_index(c: int, groupsize: int, device=None) -> Tensor:
    """(c,) group of each column when groups are consecutive columns."""
    if groupsize == -1:
        return torch.zeros(c, dtype=torch.long, device=device)
    return torch.arange(c, device=device) // groupsize


def _grid_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    bits, g = meta["bits"], grid_groups(c, meta["groupsize"])
    f = {"codes": FieldSpec((bits, r, packed_len(c)), torch.uint8, "codes"),
         "scales": FieldSpec((r, g), scale_dtype(meta), "scales"),
         "zeros": FieldSpec((bits, r, packed_len(g)), torch.uint8, "zero points")}
    if meta.get("g_idx"):
        f["g_idx"] = FieldSpec((c,), torch.int32, "group index")
    return f


def _grid_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r, c = shape
    g = grid_groups(c, meta["groupsize"])
    codes = unpack_codes(t["codes"], c)  # (r, c)
    zeros = unpack_codes(t["zeros"], g)  # (r, G)
    idx = t["g_idx"].long() if meta.get("g_idx") else grid_index(c, meta["groupsize"], codes.device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g):
        raise ValueError(f"g_idx holds a group outside 0..{g - 1}")
    return grid_values(codes, per_column(t["scales"].float(), idx), per_column(zeros, idx))


def grid_pack(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Optional[Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed grid fields from (r, c) codes, (r, G) float scales and (r, G) integer zeros."""
    bits = meta["bits"]
    out = {"codes": pack_codes(codes, bits), "scales": scales.to(scale_dtype(meta)),
           "zeros": pack_codes(zeros.round().to(torch.int32), bits)}
    if meta.get("g_idx"):
        out["g_idx"] = g_idx.to(torch.int32)
    return out


def _grid_layout(t: Tensors, shape: Shape, meta: Meta) -> Optional[Layout]:
    if meta.get("g_idx"):
        return None  # act-order groups: columns of a group are scattered
    c = shape[1]
    gs = c if meta["groupsize"] == -1 else meta["groupsize"]
    zeros = unpack_codes(t["zeros"], -(-c // gs)).float()  # (r, G)
    scale = t["scales"].float()
    return [grid_planes(unpack_codes(t["codes"], c), meta["bits"], scale, -scale * zeros, gs, stored_planes=t["codes"],
                        values=GridValues(scale, zeros))]


GRID_FORMAT = register_format(Format("grid", _grid_fields, _grid_decode, lambda shape, meta: float(meta["bits"]),
                                     _grid_layout))



# ----------------------------------------------------------------------------- quantizer



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
    tensors = grid_pack(codes, scales, zeros, g_idx, meta)
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
