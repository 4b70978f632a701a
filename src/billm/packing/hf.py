"""billm checkpoints in transformers: ``from_pretrained``, ``pipeline`` and lm-eval's ``hf`` model.

``import billm`` calls :func:`register`, which teaches transformers two things:

* the quantization method ``billm``: a :class:`BillmQuantizationConfig` and a
  :class:`BillmHfQuantizer` whose hook swaps the listed linears of the empty model for
  :class:`~billm.PackedLinear` before the weights load, so the packed tensors load into them as
  they are (their dtypes kept);
* the guard model type. A billm folder's ``config.json`` names the model type :data:`GUARD_MODEL_TYPE`
  and keeps the real one under ``billm_model_type``: transformers without billm refuses the folder
  with an error that quotes that model type, naming billm and what to do (an unknown
  ``quant_method`` alone would only log a warning and load random weights). With billm imported
  the guard reads back as the real family's config.

The guard is written into ``config.json`` by :func:`guard_config_file`, called by :func:`billm.save`
and by the ``save_pretrained`` of a model this quantizer loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import CheckpointError
from .checkpoint import QUANT_MAP, read_map, swap_in_packed
from .guard import GUARD_MODEL_TYPE, QUANT_METHOD, guard_config_file, unguard_config_dict

# ----------------------------------------------------------------------------- registration

_REGISTERED = False


def register() -> None:
    """Register billm with transformers (idempotent; ``import billm`` calls it)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer,
    )

    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer_cls)
    if GUARD_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(GUARD_MODEL_TYPE, _guard_config_class(), exist_ok=True)
    _REGISTERED = True


def _guard_config_class():
    """The config class registered under the guard model type: it reads as the real family's config."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    class GuardedConfig(PretrainedConfig):
        model_type = GUARD_MODEL_TYPE

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            real = unguard_config_dict(config_dict)
            return CONFIG_MAPPING[real["model_type"]].from_dict(real, **kwargs)

    return GuardedConfig


def _classes():
    """The transformers-facing config and quantizer classes (built on first use: transformers loads lazily)."""
    global _CLASSES
    if _CLASSES is None:
        _CLASSES = _build_classes()
    return _CLASSES


_CLASSES: Optional[tuple] = None


def _build_classes():
    from transformers.quantizers import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class BillmQuantizationConfig(QuantizationConfigMixin):
        """billm's ``quantization_config``: the method, its full config, and each packed layer's structure.

        Only checkpoints quantized by billm load with it (``requires_calibration``): quantize with
        :func:`billm.quantize` or ``billm quantize``.
        """

        def __init__(self, method: str = "billm", config: Optional[dict] = None, format_version: int = 0,
                     layers: Optional[dict] = None, **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.method, self.config = method, dict(config or {})
            self.format_version, self.layers = format_version, layers
            self.extra = {k: v for k, v in kwargs.items() if k != "quant_method"}

        def to_dict(self) -> dict[str, Any]:
            out = {"quant_method": QUANT_METHOD, "method": self.method, "format_version": self.format_version,
                   "config": self.config, **self.extra}
            if self.layers is not None:
                out["layers"] = self.layers
            return out

        def to_diff_dict(self) -> dict[str, Any]:
            return self.to_dict()

    class BillmHfQuantizer(HfQuantizer):
        """Loads billm checkpoints: the listed linears become :class:`~billm.PackedLinear` before the weights load."""

        requires_calibration = True  # a billm model is quantized by billm.quantize, never while loading

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            if not self.pre_quantized:
                raise CheckpointError("billm quantizes with billm.quantize (or `billm quantize`), not while loading")

        def _process_model_before_weight_loading(self, model, **kwargs: Any):
            layers = self.quantization_config.layers
            if layers is None:  # folders written before the layers were kept in config.json
                layers = _layers_beside(kwargs.get("checkpoint_files"))
            swap_in_packed(model, layers, where="config.json")
            return model

        def _process_model_after_weight_loading(self, model, **kwargs: Any):
            _guard_save_pretrained(model)
            return model

        def is_serializable(self, safe_serialization: Any = None) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return BillmQuantizationConfig, BillmHfQuantizer


def _layers_beside(checkpoint_files) -> dict[str, Any]:
    """The layer table of the quantization map next to the weight files (folders of format version <= 2)."""
    folder = Path(checkpoint_files[0]).parent if checkpoint_files else None
    if folder is None or not (folder / QUANT_MAP).is_file():
        raise CheckpointError(f"{folder}: an older billm checkpoint whose config.json lists no layers, without its "
                              f"quantization map ({QUANT_MAP}) beside the weights; load the folder with billm.load")
    return read_map(folder)["layers"]


def _guard_save_pretrained(model) -> None:
    """Make ``model.save_pretrained`` write the guarded config.json (plain transformers must refuse the folder)."""
    import types

    if getattr(model, "_billm_guarded_save", False):
        return
    plain = type(model).save_pretrained

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args: Any, **kwargs: Any):
        if kwargs.get("push_to_hub"):
            raise CheckpointError("save the billm model to a folder first, then upload that folder "
                                  "(huggingface_hub.upload_folder): the guarded config.json is written after saving")
        out = plain(self, save_directory, *args, **kwargs)
        config = Path(save_directory) / "config.json"
        if config.is_file():
            guard_config_file(config)
        return out

    model.save_pretrained = types.MethodType(save_pretrained, model)
    model._billm_guarded_save = True
