"""Plain 1-bit binarization: one sign bit per weight and a per-row scale (XNOR-style)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, SignConfig
from ..kernels.bitpack import pack_bits
from ..packing.formats import StoredWeight, sign_values
from .binarize import binarize_once
from .gptq import gptq_weight
from .obc import OBCTimes
from .registry import WeightResult, register_method


class SignColumns:
    """Per-column ``alpha * sign(w - mu) + mu`` with per-row (alpha, mu) fixed from the weights; records the signs."""

    def __init__(self, W0: Tensor, centred: bool, scale_dtype: Optional[torch.dtype]) -> None:
        _, alpha, mu = binarize_once(W0, torch.ones_like(W0, dtype=torch.bool), centred, scale_dtype)  # (rows,) each
        self.alpha, self.mu = alpha[:, None], (mu[:, None] if centred else None)  # (rows, 1)
        self.signs = torch.zeros_like(W0, dtype=torch.bool)  # (rows, cols)

    def __call__(self, col: int, w: Tensor) -> Tensor:
        s = (w - self.mu[:, 0] if self.mu is not None else w) >= 0  # (rows,)
        self.signs[:, col] = s
        return sign_values(s[:, None], self.alpha, self.mu)[:, 0]

    def stored(self, cfg: SignConfig) -> StoredWeight:
        """The packed signs and per-row scale (and mean)."""
        sd = SCALE_DTYPES[cfg.scale_dtype]
        tensors = {"signs": pack_bits(self.signs), "scales": self.alpha.t().to(sd)}
        if self.mu is not None:
            tensors["means"] = self.mu.t().to(sd)
        meta = {"centred": cfg.centred, "scale_dtype": cfg.scale_dtype}
        return StoredWeight("sign", tuple(self.signs.shape), meta, tensors)


@register_method(SignConfig)
def sign_quantize_weight(W: Tensor, H: Optional[Tensor], cfg: SignConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """Per-row ``alpha * sign(w - mu) + mu`` (mu = 0 unless centred), with GPTQ-style compensation if ``cfg.obc``."""
    W = W.to(torch.float32)
    sd = SCALE_DTYPES[cfg.scale_dtype]
    if not cfg.obc:
        cols = SignColumns(W, cfg.centred, sd)
        s = (W - cols.mu if cols.mu is not None else W) >= 0
        cols.signs = s
        return WeightResult(q=sign_values(s, cols.alpha, cols.mu), stored=cols.stored(cfg))
    run = gptq_weight(W, H, cfg.blocksize, cfg.percdamp, lambda W0, U: SignColumns(W0, cfg.centred, sd), times=times)
    return WeightResult(q=run.q, info={"percdamp_used": run.percdamp},
                        stored=run.quantizer.stored(cfg))  # type: ignore[attr-defined]
