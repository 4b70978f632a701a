"""The randomized Hadamard rotation ``R = D · Hn`` of incoherence processing, as pure tensor functions.

``D`` is a diagonal of random ±1 signs, ``Hn`` an orthonormal Hadamard transform of the input
dimension ``n``, so ``R`` is orthogonal and ``x Wᵀ = (x R)(W R)ᵀ``. ``Hn`` is block diagonal:
``n / b`` copies of the orthonormal ``b × b`` Sylvester-Hadamard matrix, ``b`` = the largest power of
two dividing ``n`` (:func:`hadamard_block`): 576 = 64·9 -> blocks of 64, 1536 = 512·3 -> 512,
4096 -> one block of 4096. An odd ``n`` gets ``b = 1``: the signs alone.

The transform is a reshape-based butterfly in plain torch (``log2 b`` stages of adds and
subtracts, O(n log n) a row) rather than a package: ``fast-hadamard-transform`` is a CUDA-only
extension built with nvcc, and ``hadamard-transform`` (pure torch) takes only 1-D or 2-D inputs of a
power-of-two length; neither has the block rule, and the butterfly is a few lines that run on
every device, any batch shape and any float dtype.
"""

from __future__ import annotations

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


def fwht(x: Tensor, block: int) -> Tensor:
    """Orthonormal fast Walsh-Hadamard transform of every ``block`` consecutive entries of the last dimension.

    Equals ``x @ kron(I, hadamard_matrix(block))`` (the matrix is symmetric, so also its transpose);
    the result has x's shape and dtype. ``block`` must be a power of two dividing ``x.shape[-1]``.
    """
    n = x.shape[-1]
    if block < 1 or block & (block - 1) or n % block:
        raise ValueError(f"the Hadamard block must be a power of two dividing {n}, got {block}")
    y = x.reshape(-1, n)  # (m, n)
    h = 1
    while h < block:  # stage: pairs (j, j + h) inside each run of 2h entries
        y = y.reshape(-1, n // (2 * h), 2, h)  # (m, runs, 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(block))).to(x.dtype)


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
