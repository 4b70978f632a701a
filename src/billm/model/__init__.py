"""Model plumbing: block/linear discovery, input capture, the sequential driver, loading."""

from .lazy import LazyWeights, load_skeleton
from .loading import default_model_path, load_model
from .walker import (
    capture_inputs, find_blocks, find_linears, get_weight, max_positions, replace_module, run_block,
)

__all__ = ["LazyWeights", "capture_inputs", "default_model_path", "find_blocks", "find_linears", "get_weight", "load_model",
           "load_skeleton", "max_positions", "replace_module", "run_block"]
