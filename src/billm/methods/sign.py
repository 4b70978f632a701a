"""Plain 1-bit binarization: one sign bit per weight and a per-row scale (XNOR-style)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import SignConfig
from .binarize import binarize_once, sign_pm1
from .gptq import ColumnQuantizer, gptq_weight
from .obc import OBCTimes
from .registry import WeightResult, register_method


def _sign_columns(centred: bool):
    def factory(W0: Tensor) -> ColumnQuantizer:
        _, alpha, mu = binarize_once(W0, torch.ones_like(W0, dtype=torch.bool), centred)  # (rows,) each

        def quant(col: int, w: Tensor) -> Tensor:
            return alpha * sign_pm1(w - mu) + mu

        return quant

    return factory


@register_method("sign")
def sign_quantize_weight(W: Tensor, H: Optional[Tensor], cfg: SignConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """Per-row ``alpha * sign(w - mu) + mu`` (mu = 0 unless centred), with GPTQ-style compensation if ``cfg.obc``."""
    W = W.to(torch.float32)
    if not cfg.obc:
        b, _, _ = binarize_once(W, torch.ones_like(W, dtype=torch.bool), cfg.centred)
        return WeightResult(q=b, weight_bits=1.0)
    Q, damp = gptq_weight(W, H, cfg.blocksize, cfg.percdamp, _sign_columns(cfg.centred), times=times)
    return WeightResult(q=Q, weight_bits=1.0, info={"percdamp_used": damp})
