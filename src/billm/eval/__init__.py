"""Evaluation of (quantized) models with the published protocols."""

from billm.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
