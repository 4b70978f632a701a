"""CPU decoding path: ``y = x W^T`` straight from bit planes with per-byte lookup tables.

For a few tokens ``x`` (T, n), a table holds, for every byte position ``k`` of the input and every
byte value ``v``, the sum of the inputs of the columns whose bits ``v`` sets:
``L[k, v] = sum_b bit_b(v) * x[8k + b]``. That is (n/8, 256) numbers a token, one small matmul.
A row's masked sum ``sum_{j in P} x_j`` over the columns set in a packed plane ``P`` is then a sum
of table entries, one per byte of ``P``. :func:`torch.nn.functional.embedding_bag` does those
gather-sums, a bag per row and block. Only the packed bytes are read, 1 bit a weight a plane,
and the dequantized weight never exists.

BiLLM, per row and block, with ``S`` the first signs, ``G`` the sparse-group bits, ``M`` the
salient columns, ``N = ~G & ~M`` the concentrated group, and ``Lsum[P] = sum over the block of L[k, P_k]``:

    sum_{j in A} x_j s_j = 2 Lsum[S & A] - Lsum[A]     (s = +-1 from the bit)

    y = a_c (2 Lsum[S&N] - Lsum[N]) + a_s (2 Lsum[S&G] - Lsum[G])
        + a_1 (2 Lsum[S&M] - Lsum[M]) + a_2 (2 Lsum[S2] - Lsum[M])  (+ means * Lsum[group])

``Lsum[S&N] = Lsum[S] - Lsum[S&M] - Lsum[S&G]``, ``Lsum[N] = Lsum[~M] - Lsum[G]``; ``Lsum[M]`` and
``Lsum[~M]`` are the same for every row. So five gathers a byte of a row.
Integer grids: ``sum_j x_j code_j = sum_p 2^p Lsum[plane_p]``, one gather a byte a plane.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import BiLLMPlanes, Factors, GridPlanes, factored

_BITS: dict[torch.device, Tensor] = {}


def _bit_table(device: torch.device) -> Tensor:
    """(8, 256) float32: entry (b, v) is bit b of v."""
    if device not in _BITS:
        v = torch.arange(256, device=device)
        _BITS[device] = ((v.unsqueeze(0) >> torch.arange(8, device=device).unsqueeze(1)) & 1).float()
    return _BITS[device]


def byte_table(x: Tensor) -> Tensor:
    """Lookup table of ``x`` (T, 8 m) float32: (m * 256, T), row ``256 k + v`` = sum of x[:, 8k + b] over bits b of v."""
    T = x.shape[0]
    L = x.reshape(T, -1, 8) @ _bit_table(x.device)  # (T, m, 256)
    # a fresh (m * 256, T) tensor with unit stride along T: `.contiguous()` may keep an odd stride on a
    # size-1 dim, which sends embedding_bag to a path 25x slower for one token
    return torch.empty(L.shape[1] * 256, T, dtype=L.dtype, device=L.device).copy_(L.permute(1, 2, 0).reshape(-1, T))


def bag_sums(plane: Tensor, table: Tensor, bag_bytes: int) -> Tensor:
    """Sums of table entries selected by ``plane`` (r, m) uint8, in bags of ``bag_bytes`` bytes: (r, m / bag_bytes, T)."""
    r, m = plane.shape
    idx = plane.to(torch.int32) + torch.arange(0, 256 * m, 256, dtype=torch.int32, device=plane.device)  # (r, m)
    out = F.embedding_bag(idx.view(-1, bag_bytes), table, mode="sum")  # (r * m / bag_bytes, T)
    return out.view(r, m // bag_bytes, table.shape[1])


def _padded_input(x: Tensor, nbytes_per_group: int, groupsize: int, n_groups: int) -> Tensor:
    """(T, n) -> (T, n_groups * 8 * nbytes_per_group): each group of ``groupsize`` columns zero padded to whole bytes."""
    T, n = x.shape
    width = nbytes_per_group * 8
    if width == groupsize and n == n_groups * groupsize:
        return x
    out = x.new_zeros(T, n_groups * width)
    idx = torch.arange(n, device=x.device)
    out[:, (idx // groupsize) * width + idx % groupsize] = x
    return out


def billm_lut(x: Tensor, p: BiLLMPlanes) -> Tensor:
    """``x`` (T, cols) float32 -> (T, rows): ``x W^T`` from BiLLM planes."""
    bb = (p.blocksize + 7) // 8
    nb = p.scales.shape[1]
    table = byte_table(_padded_input(x, bb, p.blocksize, nb))  # (nbytes * 256, T)
    T = x.shape[0]
    offs = torch.arange(0, 256 * p.sal.numel(), 256, device=x.device)
    # row-independent sums over each block: Lsum[M], Lsum[~M]  (nb, T)
    lm = table[offs + p.sal.long()].view(nb, bb, T).sum(1)
    lnm = table[offs + (255 - p.sal).long()].view(nb, bb, T).sum(1)
    sal = p.sal.unsqueeze(0)  # (1, nbytes)
    ls = bag_sums(p.s1, table, bb)  # (r, nb, T)
    lsg = bag_sums(p.s1 & p.grp, table, bb)
    lsm = bag_sums(p.s1 & sal, table, bb)
    lg = bag_sums(p.grp, table, bb)
    ls2 = bag_sums(p.s2, table, bb)
    ln = lnm.unsqueeze(0) - lg  # (r, nb, T)
    lsn = ls - lsm - lsg
    a = p.scales.float().unsqueeze(-1)  # (r, nb, 4, 1)
    y = a[:, :, 0] * (2 * lsn - ln) + a[:, :, 1] * (2 * lsg - lg) + a[:, :, 2] * (2 * lsm - lm) + a[:, :, 3] * (2 * ls2 - lm)
    if p.means is not None:
        mu = p.means.float().unsqueeze(-1)
        y = y + mu[:, :, 0] * ln + mu[:, :, 1] * lg + (mu[:, :, 2] + mu[:, :, 3]) * lm
    return y.sum(1).t()  # (T, r)


def grid_lut(x: Tensor, p: GridPlanes) -> Tensor:
    """``x`` (T, in) float32 -> (T, rows): the contribution of one :class:`GridPlanes`."""
    xs = x if p.cols is None else x[:, p.cols]
    G = p.scale.shape[1]
    gb = p.group_bytes
    xp = _padded_input(xs, gb, p.groupsize, G)
    table = byte_table(xp)
    codesum = sum((2.0**b) * bag_sums(p.planes[b], table, gb) for b in range(p.planes.shape[0]))  # (r, G, T)
    xsum = xp.view(xp.shape[0], G, gb * 8).sum(-1).t()  # (G, T)
    y = p.scale.unsqueeze(-1) * codesum + p.offset.unsqueeze(-1) * xsum.unsqueeze(0)  # (r, G, T)
    return y.sum(1).t()


def lut_matmul(x: Tensor, layout) -> Tensor:
    """``x`` (T, in) -> (T, out) float32 from a layout (:class:`BiLLMPlanes`, a list of :class:`GridPlanes`, or
    :class:`Factors` of those)."""
    x = x.float()
    if isinstance(layout, Factors):
        return factored(x, layout, lut_matmul)
    if isinstance(layout, BiLLMPlanes):
        return billm_lut(x, layout)
    return sum(grid_lut(x, p) for p in layout)
