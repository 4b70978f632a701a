"""The guard on a billm folder's config.json: plain transformers must refuse the folder, naming billm.

Without ``import billm``, transformers would read a packed folder's ``quantization_config`` and
load random weights in place of the packed ones; so the folder's ``model_type`` is the guard
string below, which transformers refuses with a message that tells the user what to do, and the
real model type moves to ``billm_model_type``. :mod:`.hf` teaches transformers to read it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

from ..errors import CheckpointError
from ..io import write_json_atomic

#: The ``model_type`` of a billm folder's config.json; plain transformers quotes it when it refuses the folder.
GUARD_MODEL_TYPE = "billm: a bit-packed billm checkpoint; pip install billm, then import billm before loading"
#: Where the guarded config keeps the real model type.
REAL_TYPE_KEY = "billm_model_type"
QUANT_METHOD = "billm"


def guard_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` (a config.json dict) with the guard model type; the real one moves to ``billm_model_type``."""
    if cfg.get("model_type") == GUARD_MODEL_TYPE:
        return dict(cfg)
    out = {k: v for k, v in cfg.items() if k != "model_type"}
    return {"model_type": GUARD_MODEL_TYPE, REAL_TYPE_KEY: cfg["model_type"], **out}


def unguard_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config.json dict as the real family reads it (the inverse of :func:`guard_config_dict`)."""
    if cfg.get("model_type") != GUARD_MODEL_TYPE:
        return dict(cfg)
    if not isinstance(cfg.get(REAL_TYPE_KEY), str):
        raise CheckpointError(f"a billm config.json without {REAL_TYPE_KEY!r}: the model's real type is unknown")
    out = {k: v for k, v in cfg.items() if k != REAL_TYPE_KEY}
    out["model_type"] = cfg[REAL_TYPE_KEY]
    return out


def guard_config_file(path: Union[str, Path]) -> None:
    """Rewrite ``path`` (a config.json) with the guard model type, atomically."""
    path = Path(path)
    write_json_atomic(path, guard_config_dict(json.loads(path.read_text())))
