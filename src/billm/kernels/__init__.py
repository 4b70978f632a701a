"""Fast ``y = x W^T`` from packed weights, and the choice of path for each call.

The bottom layer: bit packing (:mod:`.bitpack`), column-aligned planes (:mod:`.layout`) and the
paths that multiply from them. It imports nothing else of billm but its errors; the stored
formats (:mod:`billm.packing`) build their layouts with it.

Paths:

``dequant``
    Decode the whole weight with the format's decoder, then ``F.linear``: the reference, and every
    format's fallback.
``dense``
    Decode the whole weight from the layout, bit for bit the format's decode, then ``F.linear``: long
    prompts. On the CPU with byte tables (:mod:`.decode`), on CUDA with one Triton pass that writes
    the weight in the input's dtype (:func:`.triton_kernels.triton_decode`).
``lut``
    CPU, a few tokens (decoding): byte lookup tables over the packed planes (:mod:`.lut`).
``triton``
    CUDA (or Triton's interpreter): the weight decoded tile by tile in registers
    (:mod:`.triton_kernels`), GEMV for one token, ``tl.dot`` tiles for prompts.

``auto`` (the default) takes ``triton`` for CUDA inputs of at most :data:`TRITON_MAX_TOKENS` tokens
when Triton is installed, ``lut`` for CPU inputs of at most :data:`LUT_MAX_TOKENS` tokens, else
``dense`` (a long prompt decodes the weight once and runs cuBLAS / the CPU's dense matmul). Gradients always take
``dequant``. The environment variable ``BILLM_KERNEL`` or :func:`billm.set_kernel` force a path.
A path a layer's format cannot take (PB-LLM; GPTQ with act-order groups; ``dense`` for a layout
without exact values) falls back to ``dequant``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BillmError
from .layout import BiLLMPlanes, Factors, GridPlanes, Layout, factored

KERNELS = ("auto", "dequant", "dense", "lut", "triton")
LUT_MAX_TOKENS = 16
"""Largest token count the CPU lookup path takes under ``auto``; above it ``dense`` (decode, then matmul) is
faster. 64 when the decode was the format's own; the byte-table decoder is 2.4-7x faster than that at 128
tokens, which puts the crossover near 16 by the lookup path's measured speed against the old decode
(docs/kernels.md). ``benchmarks/bench_prompt.py --paths lut,dense`` measures it directly on a quiet machine."""
TRITON_MAX_TOKENS = 16
"""Largest token count CUDA inputs send to the Triton kernels under ``auto``; above it one decode and a
cuBLAS ``F.linear`` win. Not a measured crossover: on an H200 the kernels before the k-major planes lost to
decode-then-cuBLAS at every count for BiLLM and won up to 1 (GPTQ) and 64 (SliM-LLM) tokens
(docs/kernels.md); the k-major kernels are untimed. ``benchmarks/gpu_check.sh``'s ``crossover`` step measures it."""


def triton_available() -> bool:
    """Whether Triton can be imported."""
    return importlib.util.find_spec("triton") is not None


def requested_kernel(layer_choice: Optional[str] = None) -> str:
    """The path asked for: a layer's own choice, else ``$BILLM_KERNEL``, else ``auto``."""
    name = layer_choice or os.environ.get("BILLM_KERNEL", "auto") or "auto"
    if name not in KERNELS:
        raise BillmError(f"unknown kernel {name!r} (BILLM_KERNEL or set_kernel); choose one of {', '.join(KERNELS)}")
    return name


def choose_path(requested: str, x: Tensor, has_layout: bool, decodable: Optional[bool] = None) -> str:
    """The path one call takes (see the module docstring).

    ``has_layout``: the layer's format has a layout; ``decodable``: :mod:`.decode` decodes it exactly
    (default: ``has_layout``); without, ``dense`` becomes ``dequant``.
    """
    decodable = has_layout if decodable is None else decodable
    if requested == "dequant" or not has_layout or (x.requires_grad and torch.is_grad_enabled()):
        return "dequant"
    if requested in ("lut", "triton"):
        if requested == "triton" and not triton_available():
            raise BillmError("kernel 'triton' requested but Triton is not installed (pip install triton)")
        return requested
    if requested == "auto":
        tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
        requested = auto_path(x.is_cuda, tokens)
    return requested if requested != "dense" or decodable else "dequant"


def auto_path(cuda: bool, tokens: int) -> str:
    """The path ``auto`` takes for ``tokens`` tokens on CUDA (``cuda``) or CPU: a fast path for few tokens, else ``dense``."""
    if cuda:
        return "triton" if tokens <= TRITON_MAX_TOKENS and triton_available() else "dense"
    return "lut" if tokens <= LUT_MAX_TOKENS else "dense"


def packed_matmul(x: Tensor, layout, path: str, bias: Optional[Tensor] = None) -> Tensor:
    """``x`` (..., in) times the layout's weight transposed (plus ``bias``), by ``dense``, ``lut`` or ``triton``:
    (..., out) in x's dtype."""
    if path == "dense":
        if isinstance(layout, Factors):  # two dense products of rank r, never the whole weight
            y = factored(x, layout, lambda h, part: F.linear(h, dense_weight(part, h.shape[-1], h)))
            return y + bias if bias is not None else y
        return F.linear(x, dense_weight(layout, x.shape[-1], x), bias)
    y = _packed_matmul(x, layout, path)
    return y + bias if bias is not None else y


def dense_weight(layout, cols: int, x: Tensor) -> Tensor:
    """The layout's (rows, cols) weight in x's dtype for the ``dense`` path: on CUDA one Triton pass from the packed
    planes straight to x's dtype (:func:`.triton_kernels.triton_decode`), elsewhere the byte tables in float32
    (:func:`.decode.decode_weight`), then cast. Both are the format's decode, rounded once to x's dtype."""
    if x.is_cuda and triton_available():
        from .triton_kernels import triton_decode

        return triton_decode(layout, cols, x.dtype)
    from .decode import decode_weight

    return decode_weight(layout, cols).to(x.dtype)


def _packed_matmul(x: Tensor, layout, path: str) -> Tensor:
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if path == "lut":
        from .lut import lut_matmul

        y = lut_matmul(x2, layout)
    else:
        from .triton_kernels import triton_matmul

        y = triton_matmul(x2, layout)
    return y.to(x.dtype).reshape(*lead, y.shape[-1])


__all__ = ["BiLLMPlanes", "Factors", "GridPlanes", "KERNELS", "LUT_MAX_TOKENS", "Layout", "TRITON_MAX_TOKENS", "auto_path", "dense_weight",
           "choose_path", "packed_matmul", "requested_kernel", "triton_available"]
