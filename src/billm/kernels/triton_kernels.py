"""Triton kernels: ``y = x W^T`` with W decoded tile by tile in registers from the packed planes.

Each program owns ``BLOCK_R`` output rows and ``BLOCK_T`` tokens and walks the (byte-padded)
input columns ``BLOCK_K`` at a time: it loads the bytes of every plane for its rows, extracts the
bits, forms the weight tile with the row's scales, and accumulates ``x_tile @ w_tile^T``. The
dequantized weight never goes to memory. ``BLOCK_T == 1`` is the decoding (GEMV) path, a
broadcast-multiply and row sum; larger ``BLOCK_T`` is the tiled prompt path on ``tl.dot`` (fp16
tiles with fp32 accumulation for half-precision inputs, exact fp32 otherwise).

The kernels run on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check them against decode-then-matmul.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import BiLLMPlanes, GridPlanes


@triton.jit
def _accumulate(acc, x, w, BLOCK_T: tl.constexpr, HALF: tl.constexpr):
    """``acc (BT, BR) + x (BT, BK) @ w (BR, BK)^T``: a row sum for one token, else ``tl.dot`` tiles."""
    if BLOCK_T == 1:
        acc += tl.sum(x * w, axis=1)[None, :]
    elif HALF:
        acc += tl.dot(x.to(tl.float16), tl.trans(w.to(tl.float16)))
    else:
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    return acc


@triton.jit
def _billm_kernel(x_ptr, s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, y_ptr,
                  T, R, C, NBYTES, NB, stride_xt, stride_yt,
                  BS: tl.constexpr, BB: tl.constexpr, HAS_MEANS: tl.constexpr, HALF: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    rmask = rows < R
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, NBYTES * 8, BLOCK_K):
        pc = k0 + tl.arange(0, BLOCK_K)  # padded column (BK,)
        byte = pc // 8
        bit = pc % 8
        blk = pc // (BB * 8)
        col = blk * BS + (pc - blk * BB * 8)  # input column
        cmask = ((pc - blk * BB * 8) < BS) & (col < C)
        x = tl.load(x_ptr + toks[:, None] * stride_xt + col[None, :],
                    mask=(toks[:, None] < T) & cmask[None, :], other=0.0).to(tl.float32)  # (BT, BK)
        m2 = rmask[:, None] & (pc[None, :] < NBYTES * 8)
        boff = rows[:, None] * NBYTES + byte[None, :]
        s1 = (tl.load(s1_ptr + boff, mask=m2, other=0).to(tl.int32) >> bit[None, :]) & 1
        g = (tl.load(grp_ptr + boff, mask=m2, other=0).to(tl.int32) >> bit[None, :]) & 1
        s2 = (tl.load(s2_ptr + boff, mask=m2, other=0).to(tl.int32) >> bit[None, :]) & 1
        sal = (tl.load(sal_ptr + byte, mask=pc < NBYTES * 8, other=0).to(tl.int32) >> bit) & 1  # (BK,)
        soff = rows[:, None] * (NB * 4) + blk[None, :] * 4
        a_c = tl.load(sc_ptr + soff, mask=m2, other=0.0).to(tl.float32)
        a_s = tl.load(sc_ptr + soff + 1, mask=m2, other=0.0).to(tl.float32)
        a_1 = tl.load(sc_ptr + soff + 2, mask=m2, other=0.0).to(tl.float32)
        a_2 = tl.load(sc_ptr + soff + 3, mask=m2, other=0.0).to(tl.float32)
        is_sal = sal[None, :] == 1
        sign1 = (2 * s1 - 1).to(tl.float32)
        sign2 = (2 * s2 - 1).to(tl.float32)
        w = tl.where(is_sal, a_1, tl.where(g == 1, a_s, a_c)) * sign1 + tl.where(is_sal, a_2 * sign2, 0.0)
        if HAS_MEANS:
            m_c = tl.load(mu_ptr + soff, mask=m2, other=0.0).to(tl.float32)
            m_s = tl.load(mu_ptr + soff + 1, mask=m2, other=0.0).to(tl.float32)
            m_1 = tl.load(mu_ptr + soff + 2, mask=m2, other=0.0).to(tl.float32)
            m_2 = tl.load(mu_ptr + soff + 3, mask=m2, other=0.0).to(tl.float32)
            w += tl.where(is_sal, m_1 + m_2, tl.where(g == 1, m_s, m_c))
        w = tl.where(cmask[None, :], w, 0.0)  # (BR, BK)
        acc = _accumulate(acc, x, w, BLOCK_T, HALF)
    tl.store(y_ptr + toks[:, None] * stride_yt + rows[None, :], acc, mask=(toks[:, None] < T) & rmask[None, :])


@triton.jit
def _grid_kernel(x_ptr, planes_ptr, scale_ptr, off_ptr, cols_ptr, y_ptr,
                 T, R, N, NBYTES, G, stride_xt, stride_yt,
                 BITS: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, HAS_COLS: tl.constexpr,
                 ACCUM: tl.constexpr, HALF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    rmask = rows < R
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, NBYTES * 8, BLOCK_K):
        pc = k0 + tl.arange(0, BLOCK_K)
        byte = pc // 8
        bit = pc % 8
        grp = pc // (GB * 8)
        local = grp * GS + (pc - grp * GB * 8)  # column among the covered ones
        cmask = ((pc - grp * GB * 8) < GS) & (local < N)
        if HAS_COLS:
            col = tl.load(cols_ptr + local, mask=cmask, other=0)
        else:
            col = local
        x = tl.load(x_ptr + toks[:, None] * stride_xt + col[None, :],
                    mask=(toks[:, None] < T) & cmask[None, :], other=0.0).to(tl.float32)
        m2 = rmask[:, None] & cmask[None, :]
        code = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
        for b in tl.static_range(BITS):
            plane = tl.load(planes_ptr + b * R * NBYTES + rows[:, None] * NBYTES + byte[None, :], mask=m2, other=0)
            code += ((plane.to(tl.int32) >> bit[None, :]) & 1) << b
        goff = rows[:, None] * G + grp[None, :]
        w = tl.load(scale_ptr + goff, mask=m2, other=0.0) * code.to(tl.float32) + tl.load(off_ptr + goff, mask=m2, other=0.0)
        w = tl.where(m2, w, 0.0)
        acc = _accumulate(acc, x, w, BLOCK_T, HALF)
    ymask = (toks[:, None] < T) & rmask[None, :]
    yptr = y_ptr + toks[:, None] * stride_yt + rows[None, :]
    if ACCUM:
        acc += tl.load(yptr, mask=ymask, other=0.0)
    tl.store(yptr, acc, mask=ymask)


def _blocks(T: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_K): GEMV for one token, 16-token tiles for more (tl.dot needs >= 16)."""
    if T == 1:
        return 1, 64, 128
    return 16, 64, 64


def triton_matmul(x: Tensor, layout) -> Tensor:
    """``x`` (T, in) -> (T, out) float32 with the Triton kernels (CUDA, or the interpreter on CPU)."""
    x = x.contiguous()
    T = x.shape[0]
    BT, BR, BK = _blocks(T)
    half = x.dtype in (torch.float16, torch.bfloat16)  # tiles multiply in fp16 on the tensor cores, fp32 accumulate
    if isinstance(layout, BiLLMPlanes):
        p = layout
        R = p.rows
        y = torch.empty(T, R, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(R, BR), triton.cdiv(T, BT))
        mu = p.means if p.means is not None else p.scales
        _billm_kernel[grid](x, p.s1, p.grp, p.s2, p.sal, p.scales, mu, y, T, R, p.cols, p.s1.shape[1],
                            p.scales.shape[1], x.stride(0), y.stride(0), BS=p.blocksize, BB=(p.blocksize + 7) // 8,
                            HAS_MEANS=p.means is not None, HALF=half, BLOCK_T=BT, BLOCK_R=BR, BLOCK_K=BK)
        return y
    R = layout[0].rows
    y = torch.empty(T, R, dtype=torch.float32, device=x.device)
    for i, p in enumerate(layout):
        grid = (triton.cdiv(R, BR), triton.cdiv(T, BT))
        cols = p.cols if p.cols is not None else p.scale  # any pointer when unused
        _grid_kernel[grid](x, p.planes, p.scale, p.offset, cols, y, T, R, p.n, p.planes.shape[2], p.scale.shape[1],
                           x.stride(0), y.stride(0), BITS=p.planes.shape[0], GS=p.groupsize, GB=p.group_bytes,
                           HAS_COLS=p.cols is not None, ACCUM=i > 0, HALF=half, BLOCK_T=BT, BLOCK_R=BR, BLOCK_K=BK)
    return y
