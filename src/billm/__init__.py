"""billm: push a pretrained LLM to about one bit per weight after training (BiLLM).

Quick use::

    import billm
    report = billm.quantize(model, calibration_ids, billm.BiLLMConfig())  # linears become PackedLinear
    billm.save(model, "out-dir", tokenizer)                               # bit-packed checkpoint
    model = billm.load("out-dir", device="cpu")                           # the same PackedLinear layers

A method is a config class, a weight quantizer registered for it (:func:`register_method`) and a
stored format (:func:`register_format`); see ``docs/methods.md``.
"""

from . import kernels
from .config import SCALE_DTYPES, BreakGrid, QuantConfig, SalientMetric, SearchDomain, option
from .errors import BillmError, CheckpointError, DataError, ModelError, QuantizationError
from .methods import (
    ArbConfig, BiLLMConfig, GPTQConfig, LowRankConfig, PBLLMConfig, RTNConfig, SignConfig, SliMConfig, WeightResult, available_methods, config_from_dict, config_from_spec, get_method, method_of, register_method,
)
from .packing.checkpoint import inspect as inspect_checkpoint, load, save
from .packing.formats import FieldSpec, Format, SignPlanes, StoredWeight, register_format, storage_bits
from .packing.linear import PackedLinear, prepare_model, set_kernel
from .driver import LayerReport, QuantReport, quantize

from .packing import hf as _hf

_hf.register()  # AutoModelForCausalLM.from_pretrained(folder) loads billm checkpoints packed

__version__ = "0.1.0"

__all__ = [
    "ArbConfig", "BiLLMConfig", "BillmError", "BreakGrid", "CheckpointError", "DataError", "FieldSpec", "Format", "SignPlanes",
    "GPTQConfig", "LowRankConfig", "LayerReport", "ModelError", "PBLLMConfig", "PackedLinear", "QuantConfig", "QuantReport",
    "QuantizationError", "RTNConfig", "SCALE_DTYPES", "SalientMetric", "SearchDomain", "SignConfig", "SliMConfig",
    "StoredWeight", "WeightResult", "available_methods", "config_from_dict", "config_from_spec", "get_method",
    "inspect_checkpoint", "kernels", "load", "method_of", "option", "quantize", "register_format", "register_method",
    "prepare_model", "save", "set_kernel", "storage_bits",
]
