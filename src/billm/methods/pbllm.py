"""PB-LLM, post-training variant: salient weights at 8 bits, the rest binarized, GPTQ compensation.

Per OBC block, the top ``salient_fraction`` of the block's entries by salience (unstructured) keep
``salient_bits`` bits (min-max range per row over them); the others get one sign bit and a per-row
scale ``mean|w|`` over them. Columns are then quantized one by one with GPTQ compensation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, QuantConfig, SalientMetric, check, option
from ..kernels.bitpack import pack_bits, pack_codes, packed_len, unpack_bits, unpack_codes
from ..packing.formats import (FieldSpec, Format, Meta, Shape, StoredWeight, block_index, n_blocks, per_column, pm1,
                               register_format, round_to_stored, scale_dtype, smallest_positive)
from .billm import salience
from .gptq import gptq_block
from .rtn import grid_codes, grid_values
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class PBLLMConfig(QuantConfig):
    """PB-LLM (post-training): a fraction of the weights kept at 8 bits, the rest binarized, GPTQ compensation."""

    method: ClassVar[str] = "pbllm"
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**QuantConfig.abbrev, "f": "salient_fraction"}
    storage_estimate: ClassVar[float] = 4.5

    salient_fraction: float = option(0.1, "share of each block's weights kept salient (unstructured)")
    salient_metric: SalientMetric = option(SalientMetric.HESSIAN, "salience of a weight: hessian or magnitude")
    salient_bits: int = option(8, "bits of the salient weights (min-max per row over them)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0.0 <= self.salient_fraction < 1.0, f"salient_fraction must be in [0, 1), got {self.salient_fraction}")
        check(2 <= self.salient_bits <= 8, f"salient_bits must be in 2..8, got {self.salient_bits}")



# ----------------------------------------------------------------------------- stored format: pbllm

def pbllm_values(salient: Tensor, codes: Tensor, signs: Tensor, alpha: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """PB-LLM: the grid value ``scale * (code - zero)`` on salient entries, ``alpha * (+-1)`` elsewhere."""
    return torch.where(salient, grid_values(codes, scale, zero), alpha * pm1(signs))


def _pbllm_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    n, bits, nb = meta["n_salient"], meta["salient_bits"], n_blocks(c, meta["blocksize"])
    return {"salient_mask": FieldSpec((r, packed_len(c)), torch.uint8, "salient bitmap"),
            "codes": FieldSpec((bits, packed_len(n)), torch.uint8, "codes"),
            "signs": FieldSpec((packed_len(r * c - n),), torch.uint8, "signs"),
            "scales": FieldSpec((nb, 2, r), scale_dtype(meta), "scales"),
            "zeros": FieldSpec((bits, r, packed_len(nb)), torch.uint8, "zero points")}


def _pbllm_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r, c = shape
    n, nb = meta["n_salient"], n_blocks(c, meta["blocksize"])
    m = unpack_bits(t["salient_mask"], c)  # (r, c)
    if int(m.sum()) != n:
        raise ValueError(f"the salient bitmap has {int(m.sum())} entries set, the map says {n}")
    codes = torch.zeros(r, c, dtype=torch.uint8, device=m.device)
    codes[m] = unpack_codes(t["codes"], n)
    signs = torch.zeros(r, c, dtype=torch.bool, device=m.device)
    signs[~m] = unpack_bits(t["signs"], r * c - n)
    blk = block_index(c, meta["blocksize"], m.device)
    sc = t["scales"].float()
    zeros = unpack_codes(t["zeros"], nb)  # (r, nb)
    return pbllm_values(m, codes, signs, per_column(sc[:, 0, :].t(), blk), per_column(sc[:, 1, :].t(), blk),
                        per_column(zeros, blk))


def pbllm_pack(salient: Tensor, codes: Tensor, signs: Tensor, alpha: Tensor, scale: Tensor, zeros: Tensor,
               meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed PB-LLM fields from full (r, c) mask/codes/signs and (nb, r) alpha, scale, zeros."""
    bits = meta["salient_bits"]
    return {"salient_mask": pack_bits(salient), "codes": pack_codes(codes[salient], bits),
            "signs": pack_bits(signs[~salient]), "scales": torch.stack([alpha, scale], dim=1).to(scale_dtype(meta)),
            "zeros": pack_codes(zeros.t().round().to(torch.int32).contiguous(), bits)}


def _pbllm_weight_bits(shape: Shape, meta: Meta) -> float:
    f = meta["n_salient"] / (shape[0] * shape[1])
    return meta["salient_bits"] * f + (1 - f)


# no layout: the salient bitmap is unstructured, so every call decodes the whole weight
PBLLM_FORMAT = register_format(Format("pbllm", _pbllm_fields, _pbllm_decode, _pbllm_weight_bits))



# ----------------------------------------------------------------------------- quantizer



def salient_mask(S: Tensor, fraction: float) -> Tensor:
    """(rows, b) bool: exactly ``round(fraction * numel)`` entries with the largest salience."""
    k = int(round(fraction * S.numel()))
    mask = torch.zeros(S.numel(), dtype=torch.bool, device=S.device)
    if k:
        mask[torch.topk(S.reshape(-1), k).indices] = True
    return mask.view_as(S)


def _masked_minmax(w: Tensor, m: Tensor, bits: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero) of a min-max grid over the masked entries (rows with none: harmless 1, 0)."""
    big = torch.finfo(w.dtype).max
    lo = torch.clamp(torch.where(m, w, big).min(dim=1).values, max=0)
    hi = torch.clamp(torch.where(m, w, -big).max(dim=1).values, min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, 1.0)
    scale = round_to_stored(scale, scale_dtype).clamp(min=smallest_positive(scale_dtype))
    return scale, torch.clamp(torch.round(-lo / scale), 0, 2**bits - 1)


@register_method(PBLLMConfig)
def pbllm_quantize_weight(W: Tensor, H: Tensor, cfg: PBLLMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """PB-LLM-quantize ``W`` (rows, cols)."""
    W = W.to(torch.float32)  # the quantizer's own copy (the registry's contract): compensated in place
    prep = prepare_hessian(H, W, cfg.percdamp, release=True)
    sd = SCALE_DTYPES[cfg.scale_dtype]
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)  # salient entries
    codes = torch.zeros(rows, cols, device=W.device)
    signs = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    params: list[tuple[Tensor, Tensor, Tensor]] = []  # per block (alpha, scale, zero), each (rows,)

    def block(Wb: Tensor, Ub: Tensor, start: int):
        m = salient_mask(salience(Wb, Ub, cfg.salient_metric), cfg.salient_fraction)  # (rows, b)
        mask[:, start:start + Wb.shape[1]] = m
        non = (~m).to(Wb.dtype)
        alpha = round_to_stored((Wb.abs() * non).sum(1) / non.sum(1).clamp(min=1), sd)  # (rows,)
        scale, zero = _masked_minmax(Wb, m, cfg.salient_bits, sd)
        params.append((alpha, scale, zero))

        def quant(col: int, w: Tensor) -> Tensor:
            j = col - start
            codes[:, col] = grid_codes(w, scale, zero, cfg.salient_bits)
            signs[:, col] = w >= 0
            return pbllm_values(m[:, j], codes[:, col], signs[:, col], alpha, scale, zero)

        return gptq_block(Wb, Ub, start, quant)

    Q = obc_quantize(W, prep.U, cfg.blocksize, block, times)
    n_salient = int(mask.sum())
    alpha, scale, zero = (torch.stack(t) for t in zip(*params))  # (nb, rows) each
    meta = {"blocksize": cfg.blocksize, "salient_bits": cfg.salient_bits, "n_salient": n_salient,
            "scale_dtype": cfg.scale_dtype}
    tensors = pbllm_pack(mask, codes.to(torch.int32), signs, alpha, scale, zero, meta)
    stored = StoredWeight("pbllm", (rows, cols), meta, tensors)
    return WeightResult(q=Q, stored=stored,
                        info={"salient_weights": n_salient, "percdamp_used": prep.percdamp})
