"""The randomized Hadamard rotation ``R = D · Hn`` of incoherence processing, as pure tensor functions.

``D`` is a diagonal of random ±1 signs, ``Hn`` an orthonormal Hadamard transform of the input
dimension ``n``, so ``R`` is orthogonal and ``x Wᵀ = (x R)(W R)ᵀ``. ``Hn`` is block diagonal:
``n / b`` copies of the orthonormal ``b × b`` Sylvester-Hadamard matrix, ``b`` = the largest power of
two dividing ``n`` (:func:`hadamard_block`): 576 = 64·9 -> blocks of 64, 1536 = 512·3 -> 512,
4096 -> one block of 4096. An odd ``n`` gets ``b = 1``: the signs alone.

The transform is a fast Walsh-Hadamard transform of radix :data:`RADIX` in plain torch: with
``H_b = H_k1 ⊗ H_k2``, a row of ``b`` entries seen as a (k1, k2) matrix ``X`` becomes ``H_k1 X H_k2``,
each factor one batched matmul with a ±1 Sylvester matrix of at most 64 × 64 (``log_64 b`` passes of
O(64) work an entry: O(n log n) a row). On one CPU thread that is 3-6x faster than the radix-2
reshape butterfly, whose ``log2 b`` stages each copy the whole tensor (8 x 512 tokens: 14 against
56 ms at 576 = 64·9, 68 against 211 ms at 1536 = 512·3, 258 against 1564 ms at 4096). No package:
``fast-hadamard-transform`` is a CUDA-only extension built with nvcc, and ``hadamard-transform`` (a
pure-torch radix-2 butterfly) takes only 1-D or 2-D inputs of a power-of-two length; neither has
the block rule, and these few lines run on every device, any batch shape and any float dtype.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


def hadamard_block(n: int) -> int:
    """The block of the rule: the largest power of two dividing ``n`` (1 for odd ``n``)."""
    if n < 1:
        raise ValueError(f"a Hadamard rotation needs a positive width, got {n}")
    return n & -n


def hadamard_matrix(b: int) -> Tensor:
    """The orthonormal (b, b) Sylvester-Hadamard matrix, float64 (``b`` a power of two): for tests and checks."""
    if b < 1 or b & (b - 1):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two size, got {b}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


RADIX = 64
"""Largest Sylvester factor applied as one matmul (of 16, 32, 64 and 128, 64 was fastest overall on one CPU thread)."""


@functools.lru_cache(maxsize=None)
def _sylvester(k: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The (k, k) ±1 Sylvester-Hadamard matrix (unnormalised, symmetric), cached per dtype and device."""
    return (hadamard_matrix(k) * math.sqrt(k)).round().to(dtype=dtype, device=device)


def _hadamard_last(y: Tensor, b: int) -> Tensor:
    """``y @ H_b`` (unnormalised) over the last dimension, of size ``b``: H_b = H_(b/k) ⊗ H_k, k = min(b, RADIX)."""
    if b <= RADIX:
        return y @ _sylvester(b, y.dtype, y.device)
    y = y.reshape(*y.shape[:-1], b // RADIX, RADIX) @ _sylvester(RADIX, y.dtype, y.device)  # (..., b/k, k): X H_k
    y = _hadamard_last(y.transpose(-1, -2), b // RADIX).transpose(-1, -2)  # H_(b/k) X: the other axis
    return y.reshape(*y.shape[:-2], b)


def fwht(x: Tensor, block: int) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform of every ``block`` consecutive entries of the last dimension.

    Equals ``x @ kron(I, hadamard_matrix(block))`` (the matrix is symmetric, so also its transpose);
    the result has x's shape and dtype. ``block`` must be a power of two dividing ``x.shape[-1]``.
    """
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"the Hadamard block must be a power of two dividing {n}, got {block}")
    y = _hadamard_last(x.reshape(-1, n // block, block), block)  # (m, n/block, block)
    return (y * (1.0 / math.sqrt(block))).reshape(x.shape).to(x.dtype)


def random_signs(n: int, seed: int) -> Tensor:
    """(n,) bool, True for +1: the diagonal D, drawn on the CPU from ``seed`` (the same on every device)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).bool()


def rotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """``x R = (x D) Hn`` over the last dimension; ``signs`` (n,) ±1 floats. Half precision is computed in float32."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return fwht(work * signs.to(work.dtype), block).to(x.dtype)


def unrotate(x: Tensor, signs: Tensor, block: int) -> Tensor:
    """``x Rᵀ = (x Hn) D`` over the last dimension: the inverse of :func:`rotate`."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (fwht(work, block) * signs.to(work.dtype)).to(x.dtype)


def rotate_hessian(H: Tensor, signs: Tensor, block: int) -> Tensor:
    """``Rᵀ H R`` of a symmetric (n, n) ``H``: the Hessian of the rotated inputs ``x R`` (made exactly symmetric)."""
    M = rotate(rotate(H, signs, block).t(), signs, block)  # (H R)ᵀ R = Rᵀ H R
    return (M + M.t()) / 2
