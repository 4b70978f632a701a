"""The method registry: one entry per config class, filled by ``@register_method(ConfigClass)``.

A method is a config dataclass (:mod:`billm.config`), a weight quantizer registered for it here,
and a stored format (:func:`billm.packing.formats.register_format`). The quantizer's signature is
``fn(W, H, config, times) -> WeightResult``: ``W`` (rows, cols) float32 weights (its own copy),
``H`` (cols, cols) the undamped Hessian (None when ``config.uses_hessian`` is False), ``times`` an
:class:`~billm.methods.obc.OBCTimes` to fill. Everything else (CLI flags, compare specs, presets,
the checkpoint, storage bits, the fast paths) is derived from those three.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import Tensor

from ..config import QuantConfig
from ..errors import BillmError
from ..packing.formats import StoredWeight


@dataclass
class WeightResult:
    """A quantized weight and what the method wants reported about it.

    Attributes:
        stored: the packed form (what the model's :class:`~billm.packing.linear.PackedLinear` holds).
        info: method-specific figures (salient columns, break points, damping used, ...).
        q: optionally the (rows, cols) simulated weights the method computed; when given, the
            driver checks that ``stored`` decodes to exactly these.
    """

    stored: StoredWeight
    info: dict[str, Any] = field(default_factory=dict)
    q: Optional[Tensor] = None

    @property
    def weight_bits(self) -> float:
        """Code/sign bits per weight as papers count them (the stored format's rule)."""
        return self.stored.weight_bits


WeightQuantizer = Callable[..., WeightResult]


@dataclass(frozen=True)
class Method:
    """A registered method: its config class and weight quantizer. Calling it quantizes one weight."""

    config: type[QuantConfig]
    quantize_weight: WeightQuantizer

    @property
    def name(self) -> str:
        return self.config.method

    def __call__(self, W: Tensor, H: Optional[Tensor], config: QuantConfig, times: Any = None) -> WeightResult:
        return self.quantize_weight(W, H, config, times)


_METHODS: dict[str, Method] = {}


def register_method(config_cls: type[QuantConfig]) -> Callable[[WeightQuantizer], WeightQuantizer]:
    """Decorator: ``fn`` quantizes weights for configs of type ``config_cls`` (named ``config_cls.method``)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, QuantConfig)):
        raise TypeError(f"register_method needs a QuantConfig subclass, got {config_cls!r}")

    def deco(fn: WeightQuantizer) -> WeightQuantizer:
        old = _METHODS.get(config_cls.method)
        if old is not None and old.config is not config_cls:
            raise BillmError(f"method name {config_cls.method!r} is taken by {old.config.__name__}")
        _METHODS[config_cls.method] = Method(config_cls, fn)
        return fn

    return deco


def get_method(name: str) -> Method:
    """The method registered as ``name``."""
    if name not in _METHODS:
        raise BillmError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def method_of(config: QuantConfig) -> Method:
    """The method a config belongs to (by its exact type)."""
    m = _METHODS.get(type(config).method)
    if m is None or m.config is not type(config):
        raise BillmError(f"no method is registered for {type(config).__name__}; decorate its quantizer with "
                         f"@register_method({type(config).__name__})")
    return m


def available_methods() -> list[str]:
    """Names of the registered methods."""
    return sorted(_METHODS)


def config_classes() -> list[type[QuantConfig]]:
    """The registered config classes, by method name."""
    return [_METHODS[n].config for n in sorted(_METHODS)]


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Build the right config class from a dict carrying ``method`` (inverse of ``to_dict``)."""
    return get_method(d.get("method")).config.from_dict(d)


def config_from_spec(spec: str) -> QuantConfig:
    """A config from a compare spec ``method[:options]`` (``gptq:w2g128``, ``billm:plus+b256``)."""
    name, _, opts = spec.strip().partition(":")
    return get_method(name).config.from_spec(opts)
