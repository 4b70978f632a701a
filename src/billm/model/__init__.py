"""Model plumbing: block/linear discovery, input capture, the sequential driver, loading."""

from .loading import default_model_path, load_model
from .walker import capture_inputs, find_blocks, find_linears, get_weight, iter_blocks, run_block, set_weight

__all__ = ["default_model_path", "load_model", "capture_inputs", "find_blocks", "find_linears", "get_weight", "iter_blocks", "run_block", "set_weight"]
