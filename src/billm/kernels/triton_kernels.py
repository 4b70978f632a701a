"""Triton kernels: ``y = x W^T`` with W decoded tile by tile in registers from the packed planes.

Each program owns ``BLOCK_T`` tokens and ``BLOCK_R`` output rows and walks the (byte-padded)
input columns ``BLOCK_K`` at a time: it loads the bytes of every plane for its rows, extracts the
bits, forms the weight tile with the row's scales, and accumulates ``x_tile @ w_tile^T`` in fp32.
The dequantized weight never goes to memory. ``BLOCK_T == 1`` is the decoding (GEMV) path, a
broadcast-multiply and row sum; larger ``BLOCK_T`` is the tiled prompt path on ``tl.dot``:
half-precision inputs multiply in their own dtype (fp16 stays fp16, bf16 stays bf16: a bf16
activation above fp16's 65504 must not become inf), fp32 inputs in exact fp32.

Launch: token tiles on grid axis 0 (up to 2^31 - 1 tiles), row tiles on axis 1 (at most 65535);
token offsets are int64, so ``tokens * in_features`` may pass 2^31. Each launch runs under the input's
CUDA device (``--device cuda:1``). The block sizes come from :func:`block_sizes`: smaller row
blocks for layers with few rows, so a decoding step launches enough programs to fill the GPU.
No ``triton.autotune``: benchmarking configs is meaningless (and slow) in the interpreter the tests
use, and the grid kernel accumulates into ``y`` across calls, which a benchmark rerun would corrupt;
``benchmarks/gpu_check.sh`` times the fixed choice on a GPU instead.

The kernels run on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check them against decode-then-matmul.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .layout import BiLLMPlanes, GridPlanes

MIN_PROGRAMS = 128
"""Programs a launch aims for (about one per SM of a large GPU): layers with few rows get smaller row blocks."""
MAX_ROW_TILES = 65535  # CUDA's limit on grid axis 1

# How a tile product is formed (the kernels' DOT constant):
DOT_FP32 = 0  # fp32 inputs: exact fp32 (input_precision="ieee")
DOT_NATIVE = 1  # fp16 / bf16 inputs: tiles in the input's own dtype on the tensor cores, fp32 accumulation
DOT_BF16_EMULATED = 2  # bf16 under the interpreter, whose bf16 dot multiplies the raw bits: operands rounded
# to bf16, multiplied in fp32 (exact: a product of two bf16 values fits fp32's mantissa), fp32 accumulation


@triton.jit
def _accumulate(acc, x, w, BLOCK_T: tl.constexpr, DOT: tl.constexpr):
    """``acc (BT, BR) + x (BT, BK) @ w (BR, BK)^T``: a row sum for one token, else ``tl.dot`` tiles (see DOT_*)."""
    if BLOCK_T == 1:
        acc += tl.sum(x.to(tl.float32) * w, axis=1)[None, :]
    elif DOT == 1:
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    elif DOT == 2:
        acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.bfloat16).to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    return acc


@triton.jit
def _billm_kernel(x_ptr, s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, y_ptr,
                  T, R, C, NBYTES, NB, stride_xt, stride_yt,
                  BS: tl.constexpr, BB: tl.constexpr, HAS_MEANS: tl.constexpr, DOT: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)  # token tiles on axis 0: the unbounded dimension
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    xrow = toks.to(tl.int64) * stride_xt  # (BT,) int64: tokens * in_features may pass 2^31
    rmask = rows < R
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, NBYTES * 8, BLOCK_K):
        pc = k0 + tl.arange(0, BLOCK_K)  # padded column (BK,)
        byte = pc // 8
        bit = pc % 8
        blk = pc // (BB * 8)
        col = blk * BS + (pc - blk * BB * 8)  # input column
        cmask = ((pc - blk * BB * 8) < BS) & (col < C)
        x = tl.load(x_ptr + xrow[:, None] + col[None, :],
                    mask=(toks[:, None] < T) & cmask[None, :], other=0.0)  # (BT, BK) in x's dtype
        m2 = rmask[:, None] & (pc[None, :] < NBYTES * 8)
        boff = rows[:, None] * NBYTES + byte[None, :]  # weight offsets stay int32: a plane holds < 2^31 bytes
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
        acc = _accumulate(acc, x, w, BLOCK_T, DOT)
    yoff = toks.to(tl.int64)[:, None] * stride_yt + rows[None, :]
    tl.store(y_ptr + yoff, acc, mask=(toks[:, None] < T) & rmask[None, :])


@triton.jit
def _grid_kernel(x_ptr, planes_ptr, scale_ptr, off_ptr, cols_ptr, y_ptr,
                 T, R, N, NBYTES, G, stride_xt, stride_yt,
                 BITS: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, HAS_COLS: tl.constexpr,
                 ACCUM: tl.constexpr, DOT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    xrow = toks.to(tl.int64) * stride_xt  # (BT,) int64
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
        x = tl.load(x_ptr + xrow[:, None] + col[None, :],
                    mask=(toks[:, None] < T) & cmask[None, :], other=0.0)  # (BT, BK) in x's dtype
        m2 = rmask[:, None] & cmask[None, :]
        code = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.int32)
        for b in tl.static_range(BITS):
            plane = tl.load(planes_ptr + b * R * NBYTES + rows[:, None] * NBYTES + byte[None, :], mask=m2, other=0)
            code += ((plane.to(tl.int32) >> bit[None, :]) & 1) << b
        goff = rows[:, None] * G + grp[None, :]
        w = tl.load(scale_ptr + goff, mask=m2, other=0.0) * code.to(tl.float32) + tl.load(off_ptr + goff, mask=m2, other=0.0)
        w = tl.where(m2, w, 0.0)
        acc = _accumulate(acc, x, w, BLOCK_T, DOT)
    ymask = (toks[:, None] < T) & rmask[None, :]
    yptr = y_ptr + toks.to(tl.int64)[:, None] * stride_yt + rows[None, :]
    if ACCUM:
        acc += tl.load(yptr, mask=ymask, other=0.0)
    tl.store(yptr, acc, mask=ymask)


def block_sizes(T: int, R: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_K) for ``T`` tokens and ``R`` rows.

    GEMV (one token) or 16-token tiles (``tl.dot`` needs >= 16 on each side). The row block is the
    largest of 64, 32, 16 (8 for GEMV) that still gives :data:`MIN_PROGRAMS` programs, so a
    576-row layer decodes on 72 programs instead of 9.
    """
    bt, bk, choices = (1, 128, (64, 32, 16, 8)) if T == 1 else (16, 64, (64, 32, 16))
    token_tiles = triton.cdiv(T, bt)
    br = next((b for b in choices if token_tiles * triton.cdiv(R, b) >= MIN_PROGRAMS), choices[-1])
    while triton.cdiv(R, br) > MAX_ROW_TILES:
        br *= 2
    return bt, br, bk


def launch_grid(T: int, R: int, blocks: tuple[int, int, int]) -> tuple[int, int]:
    """(token tiles, row tiles): tokens on axis 0 (up to 2^31 - 1), rows on axis 1 (at most 65535)."""
    BT, BR, _ = blocks
    grid = (triton.cdiv(T, BT), triton.cdiv(R, BR))
    if grid[1] > MAX_ROW_TILES:
        raise ValueError(f"{R} rows in blocks of {BR} need {grid[1]} row tiles; CUDA allows {MAX_ROW_TILES}")
    return grid


def launch_guard(device: torch.device):
    """The context a launch runs in: the tensors' CUDA device (Triton launches on the current one); a no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dot_mode(dtype: torch.dtype, interpreted: bool) -> int:
    """How the prompt path multiplies tiles for inputs of ``dtype`` (the ``DOT_*`` constants)."""
    if dtype == torch.bfloat16 and interpreted:
        return DOT_BF16_EMULATED
    return DOT_NATIVE if dtype in (torch.float16, torch.bfloat16) else DOT_FP32


def _check_device(x: Tensor, planes: Tensor) -> None:
    if planes.device != x.device:
        raise ValueError(f"packed planes on {planes.device}, input on {x.device}: move the layer to the input's device")


def triton_matmul(x: Tensor, layout, blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """``x`` (T, in) -> (T, out) float32 with the Triton kernels (CUDA, or the interpreter on CPU).

    ``blocks``: (BLOCK_T, BLOCK_R, BLOCK_K) instead of :func:`block_sizes` (tests, benchmarks).
    """
    x = x.contiguous()
    T = x.shape[0]
    R = layout.rows if isinstance(layout, BiLLMPlanes) else layout[0].rows
    BT, BR, BK = blocks or block_sizes(T, R)
    grid = launch_grid(T, R, (BT, BR, BK))
    y = torch.empty(T, R, dtype=torch.float32, device=x.device)
    with launch_guard(x.device):
        if isinstance(layout, BiLLMPlanes):
            _launch_billm(x, layout, y, grid, BT, BR, BK)
        else:
            for i, p in enumerate(layout):
                _launch_grid(x, p, y, grid, i > 0, BT, BR, BK)
    return y


def _launch_billm(x: Tensor, p: BiLLMPlanes, y: Tensor, grid, BT: int, BR: int, BK: int) -> None:
    _check_device(x, p.s1)
    mu = p.means if p.means is not None else p.scales  # any pointer when unused
    dot = dot_mode(x.dtype, isinstance(_billm_kernel, InterpretedFunction))
    _billm_kernel[grid](x, p.s1, p.grp, p.s2, p.sal, p.scales, mu, y, x.shape[0], p.rows, p.cols, p.s1.shape[1],
                        p.scales.shape[1], x.stride(0), y.stride(0), BS=p.blocksize, BB=(p.blocksize + 7) // 8,
                        HAS_MEANS=p.means is not None, DOT=dot, BLOCK_T=BT, BLOCK_R=BR, BLOCK_K=BK)


def _launch_grid(x: Tensor, p: GridPlanes, y: Tensor, grid, accumulate: bool, BT: int, BR: int, BK: int) -> None:
    _check_device(x, p.planes)
    cols = p.cols if p.cols is not None else p.scale  # any pointer when unused
    dot = dot_mode(x.dtype, isinstance(_grid_kernel, InterpretedFunction))
    _grid_kernel[grid](x, p.planes, p.scale, p.offset, cols, y, x.shape[0], p.rows, p.n, p.planes.shape[2],
                       p.scale.shape[1], x.stride(0), y.stride(0), BITS=p.planes.shape[0], GS=p.groupsize,
                       GB=p.group_bytes, HAS_COLS=p.cols is not None, ACCUM=accumulate, DOT=dot, BLOCK_T=BT,
                       BLOCK_R=BR, BLOCK_K=BK)
