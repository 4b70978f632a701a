"""Better scales for fixed sign patterns: least squares on the weights, or on the layer's output.

Once the signs of a group are chosen, its per-row scales (and mean) enter the estimate linearly,
so the best ones have a closed form:

* :func:`refine_group` — per row and group, minimise ``sum (x - sum_k a_k s_k - m)^2`` over the
  group's entries (jointly over the passes of a residual binarization), then re-choose every
  entry's signs for the new scales, and repeat. Each half-step is optimal for its variables, so
  the weight error never increases.
* :func:`refit_scales` — per row, minimise the layer's output error ``(w - q) H (w - q)^T`` over
  *all* scales of the row at once (every block and group), signs fixed: one small linear system
  a row, ``(B H B^T) a = B H w``, with ``B`` the row's masked sign patterns. The current scales
  are one feasible point, so the output error cannot increase (up to fp16 rounding of the result).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..packing.formats import pm1, round_to_stored


def _solve(G: Tensor, b: Tensor, ridge: float = 1e-6) -> Tensor:
    """Batched ``G a = b`` (G (n, p, p) PSD) with a relative ridge so empty slots solve to 0."""
    p = G.shape[-1]
    scale = torch.diagonal(G, dim1=-2, dim2=-1).mean(dim=-1).clamp(min=1e-30)  # (n,)
    eye = torch.eye(p, dtype=G.dtype, device=G.device)
    return torch.linalg.solve(G + ridge * scale[:, None, None] * eye, b.unsqueeze(-1)).squeeze(-1)


def _design(signs: Tensor, mask: Tensor, centred: bool) -> Tensor:
    """(rows, p, cols) regressors of a group: each pass's +-1 signs on the mask, and a 1 for the mean."""
    m = mask.to(torch.float64)
    cols = [pm1(s).to(torch.float64) * m for s in signs]
    if centred:
        cols.append(m)
    return torch.stack(cols, dim=1)


def _best_signs(x: Tensor, a: Tensor, mean: Tensor) -> Tensor:
    """For each entry the sign combination (passes) closest to x: (order, rows, cols) bool."""
    order = a.shape[1]
    combos = torch.cartesian_prod(*[torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device)] * order).reshape(-1, order)  # (2^o, o)
    vals = (a[:, None, :] * combos[None]).sum(-1) + mean[:, None]  # (rows, 2^o)
    best = (x[:, :, None] - vals[:, None, :]).abs().argmin(dim=-1)  # (rows, cols)
    return (combos[best] > 0).permute(2, 0, 1)  # (order, rows, cols)


def refine_group(x: Tensor, mask: Tensor, signs: Tensor, centred: bool, rounds: int,
                 scale_dtype: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Alternate least-squares scales (and mean) and best signs for one masked group.

    Args:
        x: (rows, cols) the group's weights (entries off the mask are ignored).
        mask: (rows, cols) bool.
        signs: (order, rows, cols) bool, the starting signs (True = +1).
        centred: fit a per-row mean too (stored in the first pass's mean slot; the second's is 0).
        rounds: number of (scales, signs) alternations.
        scale_dtype: round the scales/means to it after each fit.

    Returns:
        (signs (order, rows, cols), alphas (order, rows), mus (order, rows)) in the stored form of
        :func:`~billm.methods.binarize.binarize_params`.
    """
    order = signs.shape[0]
    xd = x.to(torch.float64)
    md = mask.to(torch.float64)
    a = mu = None
    for _ in range(rounds):
        B = _design(signs, mask, centred)  # (rows, p, cols)
        G = B @ B.transpose(1, 2)  # (rows, p, p)
        coef = _solve(G, (B * (xd * md)[:, None, :]).sum(-1))  # (rows, p)
        a = round_to_stored(coef[:, :order].to(x.dtype), scale_dtype)
        mu = round_to_stored(coef[:, order].to(x.dtype), scale_dtype) if centred else torch.zeros_like(a[:, 0])
        signs = _best_signs(x, a, mu) & mask
    if a is None:
        raise ValueError("rounds must be >= 1")
    mus = torch.zeros(order, x.shape[0], dtype=x.dtype, device=x.device)
    mus[0] = mu
    return signs, a.t().contiguous(), mus


def group_error(x: Tensor, mask: Tensor, signs: Tensor, alphas: Tensor, mus: Tensor) -> Tensor:
    """Squared error of a group's estimate ``sum_k alpha_k s_k + mu_k`` on its mask (a 0-d tensor)."""
    est = sum(alphas[k][:, None] * pm1(signs[k]) + mus[k][:, None] for k in range(signs.shape[0]))
    return (((x - est) * mask) ** 2).sum()


def free_bytes(device: torch.device) -> int:
    """Memory free on ``device`` now: CUDA's own count, else the operating system's available memory (1 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 1 << 30


def chunk_rows(rows: int, K: int, cols: int, device: torch.device, max_bytes: Optional[int] = None) -> int:
    """Rows of :func:`refit_scales`' chunk: its float64 ``B H`` (rows, K, cols) within ``max_bytes``, by default the
    float64 Hessian's size (at least 64 MiB) and at most a quarter of the memory free on ``device``."""
    budget = max_bytes if max_bytes is not None else min(free_bytes(device) // 4, max(8 * cols * cols, 64 << 20))
    return max(1, min(rows, int(budget // (8 * K * cols))))


def refit_scales(W: Tensor, H: Tensor, patterns: Tensor, block_of: Tensor, n_blocks: int,
                 max_bytes: Optional[int] = None) -> Tensor:
    """Scales minimising ``sum_r (w_r - q_r) H (w_r - q_r)^T`` for fixed sign patterns.

    Args:
        W: (rows, cols) target weights.
        H: (cols, cols) the (damped) Hessian; solved in float64 (a float64 ``H`` is used as it is, not copied).
        patterns: (S, rows, cols), any real dtype (int8 holds them exactly): for each of the S slots of a
            block, the signed indicator of the entries that slot's scale multiplies (+-1 on its entries, 0
            elsewhere; a plain 0/1 indicator for a mean slot). Slot ``s`` of block ``b`` acts on the columns with
            ``block_of == b``.
        block_of: (cols,) block index of each column.
        n_blocks: number of blocks.
        max_bytes: memory budget of the per-chunk ``B H`` product (rows are processed in chunks; each
            chunk reads the whole Hessian once, so the larger the better). Default: the float64
            Hessian's own size (at least 64 MiB), and at most a quarter of the memory free on ``W``'s
            device, so the workspace never outgrows what the refit already holds: a chunk is then
            ``blocksize / S`` rows whatever the layer (at a 70B ``down_proj``, 28672 columns, a row's
            ``B H`` is 205 MB in float64 and a chunk 32 rows, where a fixed 256 MiB meant one row a
            chunk, the Hessian read 8192 times).

    Returns:
        (n_blocks, S, rows) the fitted scales.
    """
    S, rows, cols = patterns.shape
    K = n_blocks * S
    Hd = H.to(torch.float64)
    out = torch.empty(n_blocks, S, rows, dtype=torch.float64, device=W.device)
    chunk = chunk_rows(rows, K, cols, W.device, max_bytes)
    bounds = [(int((block_of == b).nonzero().min()), int((block_of == b).nonzero().max()) + 1) for b in range(n_blocks)]
    for r0 in range(0, rows, chunk):
        r1 = min(rows, r0 + chunk)
        P = patterns[:, r0:r1].to(torch.float64)  # (S, n, cols)
        n = r1 - r0
        BH = torch.empty(n, K, cols, dtype=torch.float64, device=W.device)
        for b, (c0, c1) in enumerate(bounds):
            Bb = P[:, :, c0:c1].permute(1, 0, 2)  # (n, S, bs)
            BH[:, b * S:(b + 1) * S] = Bb @ Hd[c0:c1]  # (n, S, cols)
        G = torch.empty(n, K, K, dtype=torch.float64, device=W.device)
        for b, (c0, c1) in enumerate(bounds):
            Bb = P[:, :, c0:c1].permute(1, 2, 0)  # (n, bs, S)
            G[:, :, b * S:(b + 1) * S] = BH[:, :, c0:c1] @ Bb
        rhs = (BH @ W[r0:r1].to(torch.float64).unsqueeze(-1)).squeeze(-1)  # (n, K)
        a = _solve(G, rhs)  # (n, K)
        out[:, :, r0:r1] = a.reshape(n, n_blocks, S).permute(1, 2, 0)
    return out.to(W.dtype)
