"""PB-LLM, post-training variant: salient weights at 8 bits, the rest binarized, GPTQ compensation.

Per OBC block, the top ``salient_fraction`` of the block's entries by salience (unstructured) keep
``salient_bits`` bits (min-max range per row over them); the others get one sign bit and a per-row
scale ``mean|w|`` over them. Columns are then quantized one by one with GPTQ compensation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, PBLLMConfig
from ..packing.formats import StoredWeight, pbllm_pack, pbllm_values, round_to_stored, smallest_positive
from .billm import salience
from .gptq import gptq_block
from .rtn import grid_codes
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method


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
    W = W.to(torch.float32).clone()
    prep = prepare_hessian(H, W, cfg.percdamp)
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
