"""billm: push a pretrained LLM to about one bit per weight after training (BiLLM).

Quick use::

    import billm
    report = billm.quantize(model, calibration_ids, billm.BiLLMConfig())
    billm.save(model, report, "out-dir", tokenizer)      # bit-packed checkpoint
    model = billm.load("out-dir", device="cpu")         # PackedLinear layers, decoded per call
"""

from . import kernels
from .config import BiLLMConfig, BreakGrid, QuantConfig, SalientMetric, SearchDomain, SliMConfig, config_from_dict
from .errors import BillmError, CheckpointError, DataError, ModelError, QuantizationError
from .methods import available_methods, get_method, register_method
from .packing.checkpoint import inspect as inspect_checkpoint, load, save
from .packing.linear import PackedLinear
from .quantize import LayerReport, QuantReport, quantize

__version__ = "0.1.0"

__all__ = [
    "BiLLMConfig", "BillmError", "BreakGrid", "CheckpointError", "DataError", "LayerReport", "ModelError",
    "PackedLinear", "QuantConfig", "QuantReport", "QuantizationError", "SalientMetric", "SearchDomain", "SliMConfig",
    "available_methods", "config_from_dict", "get_method", "inspect_checkpoint", "load", "quantize",
    "kernels", "register_method", "save",
]
