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
blocks for layers with few rows, so a decoding step launches enough programs to fill the GPU; they
are then shrunk until their shared memory fits the device (:mod:`.tiles`).
No ``triton.autotune``: benchmarking configs is meaningless (and slow) in the interpreter the tests
use, and the grid kernel accumulates into ``y`` across calls, which a benchmark rerun would corrupt;
``benchmarks/gpu_check.sh`` times the fixed choice on a GPU instead.

The kernels run on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check them against decode-then-matmul.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction

from .layout import BiLLMPlanes, GridPlanes
from .tiles import Footprint, Tiles, block_sizes, fit_tiles, launch_grid, shrink_below

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


def device_smem_limit(device: torch.device) -> Optional[int]:
    """Shared memory one program may use on ``device`` (bytes), None where there is no such limit (the interpreter)."""
    if device.type != "cuda" or isinstance(_billm_kernel, InterpretedFunction):
        return None
    return _cuda_smem_limit(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_smem_limit(index: int) -> int:
    try:  # what Triton itself checks a launch against
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except (AttributeError, KeyError, RuntimeError):
        props = torch.cuda.get_device_properties(index)
        return int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)


def footprint(x: Tensor, layout) -> Footprint:
    """Bytes a K step of the kernel for ``layout`` loads per tile element (see :mod:`.tiles`)."""
    if isinstance(layout, BiLLMPlanes):
        scale_bytes = 4 * layout.scales.element_size() * (2 if layout.means is not None else 1)  # 4 slots per element
        return Footprint(per_weight=3 + scale_bytes, per_input=x.element_size(), per_column=1)  # s1, grp, s2; sal
    bits = max(p.planes.shape[0] for p in layout)
    has_cols = any(p.cols is not None for p in layout)
    return Footprint(per_weight=bits + 8, per_input=x.element_size(), per_column=8 if has_cols else 0)  # scale, offset fp32


def triton_matmul(x: Tensor, layout, blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """``x`` (T, in) -> (T, out) float32 with the Triton kernels (CUDA, or the interpreter on CPU).

    ``blocks``: (BLOCK_T, BLOCK_R, BLOCK_K) wanted instead of :func:`block_sizes` (tests, benchmarks).
    Either way the tiles are shrunk to fit the device's shared memory (:func:`billm.kernels.tiles.fit_tiles`),
    and a launch that still runs out of it is retried with smaller tiles.
    """
    x = x.contiguous()
    T = x.shape[0]
    R = layout.rows if isinstance(layout, BiLLMPlanes) else layout[0].rows
    fp = footprint(x, layout)
    tiles = fit_tiles(Tiles(*(blocks or block_sizes(T, R))), fp, device_smem_limit(x.device))
    y = torch.empty(T, R, dtype=torch.float32, device=x.device)
    with launch_guard(x.device):
        launch_fitted(lambda t: _launch(x, layout, y, t), tiles, fp)
    return y


def launch_fitted(launch, tiles: Tiles, fp: Footprint) -> Tiles:
    """``launch(tiles)``; on Triton's ``OutOfResources`` (raised when the kernel is loaded, before it runs) again
    with the next smaller tiles (:func:`billm.kernels.tiles.shrink_below`). Returns the tiles that ran."""
    while True:
        try:
            launch(tiles)
            return tiles
        except OutOfResources:
            smaller = shrink_below(tiles, fp)
            if smaller is None:
                raise
            tiles = smaller


def _launch(x: Tensor, layout, y: Tensor, tiles: Tiles) -> None:
    grid = launch_grid(x.shape[0], y.shape[1], tiles.blocks)
    if isinstance(layout, BiLLMPlanes):
        _launch_billm(x, layout, y, grid, tiles)
    else:
        for i, p in enumerate(layout):
            _launch_grid(x, p, y, grid, i > 0, tiles)


def _launch_billm(x: Tensor, p: BiLLMPlanes, y: Tensor, grid, tiles: Tiles) -> None:
    _check_device(x, p.s1)
    mu = p.means if p.means is not None else p.scales  # any pointer when unused
    dot = dot_mode(x.dtype, isinstance(_billm_kernel, InterpretedFunction))
    _billm_kernel[grid](x, p.s1, p.grp, p.s2, p.sal, p.scales, mu, y, x.shape[0], p.rows, p.cols, p.s1.shape[1],
                        p.scales.shape[1], x.stride(0), y.stride(0), BS=p.blocksize, BB=(p.blocksize + 7) // 8,
                        HAS_MEANS=p.means is not None, DOT=dot, BLOCK_T=tiles.t, BLOCK_R=tiles.r, BLOCK_K=tiles.k,
                        num_stages=tiles.stages)


def _launch_grid(x: Tensor, p: GridPlanes, y: Tensor, grid, accumulate: bool, tiles: Tiles) -> None:
    _check_device(x, p.planes)
    cols = p.cols if p.cols is not None else p.scale  # any pointer when unused
    dot = dot_mode(x.dtype, isinstance(_grid_kernel, InterpretedFunction))
    _grid_kernel[grid](x, p.planes, p.scale, p.offset, cols, y, x.shape[0], p.rows, p.n, p.planes.shape[2],
                       p.scale.shape[1], x.stride(0), y.stride(0), BITS=p.planes.shape[0], GS=p.groupsize,
                       GB=p.group_bytes, HAS_COLS=p.cols is not None, ACCUM=accumulate, DOT=dot, BLOCK_T=tiles.t,
                       BLOCK_R=tiles.r, BLOCK_K=tiles.k, num_stages=tiles.stages)
