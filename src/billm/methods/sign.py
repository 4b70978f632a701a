"""Plain 1-bit binarization: one sign bit per weight and a per-row scale (XNOR-style)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, QuantConfig, option
from ..kernels.bitpack import pack_bits, packed_len, unpack_bits
from ..kernels.layout import GridValues, Layout, grid_planes
from ..packing.formats import FieldSpec, Format, Meta, Shape, StoredWeight, Tensors, pm1, register_format, scale_dtype
from .binarize import binarize_once
from .gptq import gptq_weight
from .obc import OBCTimes
from .registry import WeightResult, register_method


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class SignConfig(QuantConfig):
    """Plain 1-bit binarization with a per-row scale (XNOR-style), optionally with OBC compensation."""

    method: ClassVar[str] = "sign"
    storage_estimate: ClassVar[float] = 1.5

    centred: bool = option(False, "subtract a per-row mean before binarizing (one more stored value per row)")
    obc: bool = option(True, "GPTQ-style error compensation (off: no Hessian needed)")

    @property
    def uses_hessian(self) -> bool:  # type: ignore[override]
        return self.obc



# ----------------------------------------------------------------------------- stored format: sign

def sign_values(s: Tensor, scale: Tensor, mean: Optional[Tensor]) -> Tensor:
    """``scale * (+-1) (+ mean)``; scale and mean broadcast against the (r, c) bool signs."""
    q = scale * pm1(s)
    return q + mean if mean is not None else q


def _sign_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    f = {"signs": FieldSpec((r, packed_len(c)), torch.uint8, "signs"),
         "scales": FieldSpec((1, r), scale_dtype(meta), "scales")}
    if meta["centred"]:
        f["means"] = FieldSpec((1, r), scale_dtype(meta), "means")
    return f


def _sign_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    mean = t["means"].float().t() if meta["centred"] else None
    return sign_values(unpack_bits(t["signs"], shape[1]), t["scales"].float().t(), mean)


def _sign_layout(t: Tensors, shape: Shape, meta: Meta) -> Layout:
    s = unpack_bits(t["signs"], shape[1]).to(torch.int32)
    alpha = t["scales"].float().t()  # (r, 1)
    mean = t["means"].float().t() if meta["centred"] else torch.zeros_like(alpha)
    return [grid_planes(s, 1, 2 * alpha, mean - alpha, shape[1], stored_planes=t["signs"].unsqueeze(0),
                        values=GridValues(alpha, shift=mean if meta["centred"] else None, signed=True))]


SIGN_FORMAT = register_format(Format("sign", _sign_fields, _sign_decode, lambda shape, meta: 1.0, _sign_layout))



# ----------------------------------------------------------------------------- quantizer



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
    run = gptq_weight(W, H, cfg.blocksize, cfg.percdamp, lambda W0, U: SignColumns(W0, cfg.centred, sd), times=times,
                      release=True)
    return WeightResult(q=run.q, info={"percdamp_used": run.percdamp},
                        stored=run.quantizer.stored(cfg))  # type: ignore[attr-defined]
