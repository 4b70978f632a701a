"""billm: push a pretrained LLM to about one bit per weight after training (BiLLM).

Quick use::

    import billm
    report = billm.quantize(model, calibration_ids, billm.BiLLMConfig())
"""

from .config import BiLLMConfig, BreakGrid, QuantConfig, SalientMetric, SearchDomain, config_from_dict
from .errors import BillmError, DataError, ModelError, QuantizationError
from .methods import available_methods, get_method, register_method
from .quantize import LayerReport, QuantReport, quantize

__version__ = "0.1.0"

__all__ = [
    "BiLLMConfig", "BillmError", "BreakGrid", "DataError", "LayerReport", "ModelError", "QuantConfig",
    "QuantReport", "QuantizationError", "SalientMetric", "SearchDomain", "available_methods",
    "config_from_dict", "get_method", "quantize", "register_method",
]
