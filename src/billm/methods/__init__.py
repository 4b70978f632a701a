"""Quantization methods: pure tensor math, no model knowledge."""

from . import billm as _billm  # noqa: F401  (registers "billm")
from .registry import WeightResult, available_methods, get_method, register_method

__all__ = ["WeightResult", "available_methods", "get_method", "register_method"]
