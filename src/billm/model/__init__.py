"""Model plumbing: block/linear discovery, input capture, the sequential driver, loading."""

from .walker import capture_inputs, find_blocks, find_linears, get_weight, iter_blocks, run_block, set_weight

__all__ = ["capture_inputs", "find_blocks", "find_linears", "get_weight", "iter_blocks", "run_block", "set_weight"]
