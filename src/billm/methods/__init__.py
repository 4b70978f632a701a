"""Quantization methods: pure tensor math, no model knowledge.

Each method is one module holding its config class, its stored format and its quantizer, and
registers the last two (importing the module is enough): the plug-in shape of ``tests/test_plugin.py``.
"""

from .arb import ArbConfig
from .billm import BiLLMConfig
from .gptq import GPTQConfig
from .lowrank import LowRankConfig
from .pbllm import PBLLMConfig
from .rtn import RTNConfig
from .sign import SignConfig
from .slim import SBAError, SliMConfig
from .registry import (
    Method, WeightResult, available_methods, config_classes, config_from_dict, config_from_spec, get_method, method_of,
    register_method,
)

__all__ = ["ArbConfig", "BiLLMConfig", "GPTQConfig", "LowRankConfig", "Method", "PBLLMConfig", "RTNConfig", "SBAError",
           "SignConfig", "SliMConfig", "WeightResult", "available_methods", "config_classes", "config_from_dict", "config_from_spec",
           "get_method", "method_of", "register_method"]
