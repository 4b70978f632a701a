"""Evaluation of (quantized) models with the published protocols."""

from billm.eval.perplexity import PerplexityResult, perplexity
from billm.eval.zeroshot import TaskResult, zeroshot

__all__ = ["PerplexityResult", "TaskResult", "perplexity", "zeroshot"]
