"""Quantization methods: pure tensor math, no model knowledge."""

from . import billm as _billm  # noqa: F401  (each module registers its method)
from . import gptq as _gptq  # noqa: F401
from . import pbllm as _pbllm  # noqa: F401
from . import rtn as _rtn  # noqa: F401
from . import sign as _sign  # noqa: F401
from . import slim as _slim  # noqa: F401
from .registry import WeightResult, available_methods, get_method, register_method

__all__ = ["WeightResult", "available_methods", "get_method", "register_method"]
