"""Sign and residual binarization of masked groups (pure tensor math).

A *group* is a boolean mask over a (rows, cols) matrix. Binarizing a group works per row, over
that row's masked entries only:

    mu    = mean(x)                      (0 when not centred)
    alpha = mean |x - mu|
    b     = alpha * sign(x - mu) + mu    with sign(0) = +1, so every entry is one stored bit

(The reference code's torch.sign gives 0 there; the two differ only for an entry exactly equal to
its group's mean, and the reference test reproduces its output.)

Order 2 repeats this on the residual ``x - b`` and sums (binary residual approximation). A row
with no masked entries gets 0. Entries outside the mask are 0 in the result.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..packing.formats import round_to_stored


def sign_pm1(x: Tensor) -> Tensor:
    """+1 where x >= 0, -1 elsewhere (a stored bit per entry; never 0)."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def binarize_once(x: Tensor, mask: Tensor, centred: bool = True,
                  scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One binarization pass over a masked group.

    Args:
        x: (rows, cols) values.
        mask: (rows, cols) bool, the group.
        centred: subtract the per-row group mean first.
        scale_dtype: round the mean, then the scale, to this dtype before use (as stored).

    Returns:
        (b, alpha, mu): ``b`` (rows, cols) the estimate (0 off the mask), ``alpha`` and ``mu``
        (rows,) the per-row scale and mean.
    """
    m = mask.to(x.dtype)  # (rows, cols)
    d, alpha, mu = _pass(x, m, m.sum(dim=1).clamp(min=1), centred, scale_dtype)
    return _estimate(d, alpha, mu, m), alpha, mu


def _pass(r: Tensor, m: Tensor, n: Tensor, centred: bool,
          scale_dtype: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor]:
    """One pass's (d = r - mu (rows, cols), alpha (rows,), mu (rows,)) over the group ``m`` (float 0/1) of
    ``n`` entries per row (clamped to >= 1). Uncentred, d is r itself (r - 0 is r, bit for bit)."""
    mu = round_to_stored((r * m).sum(dim=1) / n, scale_dtype) if centred else r.new_zeros(r.shape[0])
    d = r - mu[:, None] if centred else r
    return d, round_to_stored((d.abs() * m).sum(dim=1) / n, scale_dtype), mu


def _estimate(d: Tensor, alpha: Tensor, mu: Tensor, m: Tensor) -> Tensor:
    """``alpha * sign(d) + mu`` on the group, 0 off it: (rows, cols)."""
    return (alpha[:, None] * sign_pm1(d) + mu[:, None]) * m


def binarize(x: Tensor, mask: Tensor, order: int = 1, centred: bool = True,
             scale_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Order-``order`` residual binarization of the masked group of ``x``; 0 off the mask.

    Args:
        x: (rows, cols).
        mask: (rows, cols) bool.
        order: 1 (plain) or more (each further pass binarizes the residual and adds it).
        centred: per-row mean subtraction in each pass.
        scale_dtype: dtype scales and means are rounded to (None: kept exact).

    Returns:
        (rows, cols) estimate; within a row the group takes at most ``2**order`` values.
    """
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    out = torch.zeros_like(x)
    for _ in range(order):
        b, _, _ = binarize_once(x - out, mask, centred, scale_dtype)
        out = out + b
    return out


def binarize_params(x: Tensor, mask: Tensor, order: int = 1, centred: bool = True,
                    scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Stored form of :func:`binarize`: sign bits and per-pass scales/means (rounded to ``scale_dtype``).

    The same passes as :func:`binarize_once`, without what the stored form does not need: the
    last pass's estimate, and subtracting a zero (first residual, uncentred means).

    Returns:
        (signs, alphas, mus): ``signs`` (order, rows, cols) bool (True = +1, only meaningful on the
        mask), ``alphas`` and ``mus`` (order, rows). ``sum_k (alpha_k * (2*sign_k - 1) + mu_k)`` on the
        mask reproduces :func:`binarize`.
    """
    m = mask.to(x.dtype)  # (rows, cols)
    n = m.sum(dim=1).clamp(min=1)  # (rows,)
    out = torch.zeros_like(x)
    signs, alphas, mus = [], [], []
    for k in range(order):
        d, alpha, mu = _pass(x - out if k else x, m, n, centred, scale_dtype)  # x - 0 is x, bit for bit
        signs.append(d >= 0)
        alphas.append(alpha)
        mus.append(mu)
        if k + 1 < order:  # the next pass binarizes what this one left
            out = out + _estimate(d, alpha, mu, m)
    return torch.stack(signs), torch.stack(alphas), torch.stack(mus)


def sq_error(x: Tensor, estimate: Tensor) -> Tensor:
    """Sum of squared differences (a 0-d tensor)."""
    return ((x - estimate) ** 2).sum()
