"""Bit accounting: the one place that says what each method would have to store.

Rules, the same for every method:

* every stored real number (scale, mean) costs the config's ``scale_dtype``: 16 bits (fp16, the
  default), 32, or 8 (fp8 e4m3);
* integer codes cost their bit width; a zero point of a ``b``-bit grid costs ``b`` bits;
* a choice among two groups costs one bit per entry (a bitmap), a per-column flag one bit per column;
* ``storage_bits`` is all of that divided by the number of weights of the layer. ``weight_bits``
  (reported separately) counts only the code/sign bits, as papers do.

BiLLM, per block of ``b`` columns with ``k`` salient columns and ``r`` rows: ``r*b`` first sign
bits, ``r*k`` second-plane sign bits (order 2), ``r*(b-k)`` group bits (concentrated/sparse),
``b`` column flags, and per row ``salient_order + 2`` scales (twice that when mean-centred).
RTN/GPTQ: ``bits`` per weight, per row and group one fp16 scale and a ``bits``-bit zero; with
act-order groups, a 32-bit group index per column.
SliM-LLM: each group's width per weight, per row and group one fp16 scale and a zero at the
layer's widest width, and one byte per group for its width (kept in the checkpoint's JSON map).
Sign: 1 bit per weight, per row one fp16 scale (and a mean when centred).
PB-LLM: 1 bit per binarized weight, ``salient_bits`` per salient weight, a 1-bit salient bitmap
over all weights, per row and block one fp16 binary scale, one fp16 scale and a zero for the
salient grid.
"""

from __future__ import annotations

import math
from typing import Any

FP16 = 16


def _scale_bits(config: dict[str, Any]) -> int:
    return {"float32": 32, "float8_e4m3fn": 8}.get(config.get("scale_dtype"), FP16)


def storage_bits(config: dict[str, Any], shape: tuple[int, int], info: dict[str, Any], weight_bits: float) -> float:
    """Bits per weight that the stored form of one quantized linear needs (see module rules)."""
    rows, cols = shape
    n = rows * cols
    method = config["method"]
    fp = _scale_bits(config)
    if method == "billm":
        bs = config["blocksize"]
        per_scale = fp * (2 if config.get("centred") else 1)
        total = 0
        for b_idx, cols_k in enumerate(info["salient_columns"]):
            b = min(bs, cols - b_idx * bs)
            k = len(cols_k)
            total += rows * b + rows * k * (config["salient_order"] - 1) + rows * (b - k) + b
            total += rows * (config["salient_order"] + 2) * per_scale
        return total / n
    if method in ("rtn", "gptq"):
        bits, gs = config["bits"], config["groupsize"]
        groups = 1 if gs == -1 else math.ceil(cols / gs)
        g_idx = 32 * cols if config.get("act_order") and groups > 1 else 0
        return (n * bits + rows * groups * (fp + bits) + g_idx) / n
    if method == "slim":
        gb, gs = info["group_bits"], config["groupsize"]
        sizes = [min(gs, cols - g * gs) for g in range(len(gb))]
        return (rows * sum(m * b for m, b in zip(sizes, gb)) + rows * len(gb) * (fp + max(gb)) + 8 * len(gb)) / n
    if method == "sign":
        return (n + rows * fp * (2 if config.get("centred") else 1)) / n
    if method == "pbllm":
        blocks = math.ceil(cols / config["blocksize"])
        s = info["salient_weights"]
        return (s * config["salient_bits"] + (n - s) + n + rows * blocks * (2 * fp + config["salient_bits"])) / n
    return weight_bits  # unknown method: no better figure than its own count
