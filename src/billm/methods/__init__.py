"""Quantization methods: pure tensor math, no model knowledge; each module registers its method."""

from . import arb as _arb  # noqa: F401  (each module registers its method)
from . import billm as _billm  # noqa: F401
from . import gptq as _gptq  # noqa: F401
from . import pbllm as _pbllm  # noqa: F401
from . import rtn as _rtn  # noqa: F401
from . import sign as _sign  # noqa: F401
from . import slim as _slim  # noqa: F401
from .registry import (
    Method, WeightResult, available_methods, config_classes, config_from_dict, config_from_spec, get_method, method_of,
    register_method,
)

__all__ = ["Method", "WeightResult", "available_methods", "config_classes", "config_from_dict", "config_from_spec",
           "get_method", "method_of", "register_method"]
