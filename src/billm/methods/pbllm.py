"""PB-LLM, post-training variant: salient weights at 8 bits, the rest binarized, GPTQ compensation.

Per OBC block, the top ``salient_fraction`` of the block's entries by salience (unstructured) keep
``salient_bits`` bits (min-max range per row over them); the others get one sign bit and a per-row
scale ``mean|w|`` over them. Columns are then quantized one by one with GPTQ compensation.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import PBLLMConfig
from .billm import salience
from .binarize import sign_pm1
from .gptq import gptq_block
from .obc import OBCTimes, obc_quantize, prepare_hessian
from .registry import WeightResult, register_method


def salient_mask(S: Tensor, fraction: float) -> Tensor:
    """(rows, b) bool: exactly ``round(fraction * numel)`` entries with the largest salience."""
    k = int(round(fraction * S.numel()))
    mask = torch.zeros(S.numel(), dtype=torch.bool, device=S.device)
    if k:
        mask[torch.topk(S.reshape(-1), k).indices] = True
    return mask.view_as(S)


def _masked_minmax(w: Tensor, m: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero) of a min-max grid over the masked entries (rows with none: harmless 1, 0)."""
    big = torch.finfo(w.dtype).max
    lo = torch.clamp(torch.where(m, w, big).min(dim=1).values, max=0)
    hi = torch.clamp(torch.where(m, w, -big).max(dim=1).values, min=0)
    scale = (hi - lo) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, 1.0)
    return scale, torch.round(-lo / scale)


@register_method("pbllm")
def pbllm_quantize_weight(W: Tensor, H: Tensor, cfg: PBLLMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """PB-LLM-quantize ``W`` (rows, cols)."""
    W = W.to(torch.float32).clone()
    prep = prepare_hessian(H, W, cfg.percdamp)
    maxq = 2**cfg.salient_bits - 1
    n_salient = 0

    def block(Wb: Tensor, Ub: Tensor, start: int):
        nonlocal n_salient
        m = salient_mask(salience(Wb, Ub, cfg.salient_metric), cfg.salient_fraction)  # (rows, b)
        n_salient += int(m.sum())
        non = (~m).to(Wb.dtype)
        alpha = (Wb.abs() * non).sum(1) / non.sum(1).clamp(min=1)  # (rows,)
        scale, zero = _masked_minmax(Wb, m, cfg.salient_bits)

        def quant(col: int, w: Tensor) -> Tensor:
            j = col - start
            q8 = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            return torch.where(m[:, j], q8, alpha * sign_pm1(w))

        return gptq_block(Wb, Ub, start, quant)

    Q = obc_quantize(W, prep.U, cfg.blocksize, block, times)
    f = n_salient / W.numel()
    return WeightResult(q=Q, weight_bits=cfg.salient_bits * f + (1 - f),
                        info={"salient_weights": n_salient, "percdamp_used": prep.percdamp})
