"""Method registry: ``@register_method("name")`` on a weight quantizer function.

A weight quantizer has the signature ``fn(W, H, config, times) -> WeightResult``: ``W`` (rows,
cols) float32 weights (its own copy), ``H`` (cols, cols) the undamped Hessian, ``config`` the
method's config dataclass, ``times`` an :class:`~billm.methods.obc.OBCTimes` to fill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor

from ..errors import BillmError
from ..packing.formats import StoredWeight


@dataclass
class WeightResult:
    """A quantized weight and what the method wants reported about it.

    Attributes:
        q: (rows, cols) the dequantized (simulated) weights.
        weight_bits: bits per weight as papers count them (sign bits only for binary methods).
        info: method-specific figures (salient columns, break points, damping used, ...).
        stored: the packed form a checkpoint keeps; ``stored.values()`` equals ``q`` exactly.
    """

    q: Tensor
    weight_bits: float
    info: dict[str, Any] = field(default_factory=dict)
    stored: Optional[StoredWeight] = None


_METHODS: dict[str, Callable[..., WeightResult]] = {}


def register_method(name: str) -> Callable[[Callable[..., WeightResult]], Callable[..., WeightResult]]:
    """Decorator registering a weight quantizer under ``name``."""

    def deco(fn: Callable[..., WeightResult]) -> Callable[..., WeightResult]:
        _METHODS[name] = fn
        return fn

    return deco


def get_method(name: str) -> Callable[..., WeightResult]:
    """The weight quantizer registered as ``name``."""
    if name not in _METHODS:
        raise BillmError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)
