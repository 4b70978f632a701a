"""Triton kernels: ``y = x W^T`` with W decoded tile by tile in registers from the packed planes, and
the whole W decoded to memory for the long-prompt path.

The loops follow the format's blocks (BiLLM) or groups (grid formats): a program owns ``BLOCK_R``
output rows and ``BLOCK_T`` tokens and walks a range of blocks; it loads a block's scales (and
means) once per row, then the block's bytes of every plane ``BLOCK_K`` columns at a time, extracts
the bits, forms the weight tile and accumulates ``x_tile @ w_tile^T`` in fp32. The weight never
goes to memory. ``BLOCK_T == 1`` is the decoding (GEMV) path, a broadcast-multiply and row sum;
``BLOCK_T >= 16`` the tiled path on ``tl.dot``: half-precision inputs multiply in their own dtype
(fp16 stays fp16, bf16 stays bf16: a bf16 activation above fp16's 65504 must not become inf), fp32
inputs in exact fp32.

A decoding step multiplies one token by a whole layer: one program per row block leaves most of a
large GPU idle (a 4096-row layer in 32-row blocks is 128 programs on 132 SMs, each walking all
32 blocks one after the other, latency-bound). So the blocks are split among programs too
(split-K, grid axis 2, :func:`billm.kernels.tiles.split_count`): each split writes its partial sums
to its own slice of an fp32 buffer, and the slices are summed afterwards, in a fixed order (the
result does not depend on scheduling, unlike atomic adds).

Every weight is computed by the same fp32 operations, in the same order, as the format's decoder
(:mod:`.decode`), so :func:`triton_decode` is bit for bit the format's decode under the interpreter
(and on a GPU wherever the compiler does not contract a multiply and an add: BiLLM's products are
by +-1, exact either way).

Launch: token tiles on grid axis 0 (up to 2^31 - 1 tiles), row tiles on axis 1 (at most 65535),
splits on axis 2; token offsets are int64, so ``tokens * in_features`` may pass 2^31. Each launch
runs under the input's CUDA device (``--device cuda:1``). The tile sizes come from
:func:`billm.kernels.tiles.block_sizes` and are shrunk until their shared memory fits the device.
No ``triton.autotune``: benchmarking configs is meaningless (and slow) in the interpreter the tests
use; ``benchmarks/bench_kernels.py --tune`` times the choices on a GPU instead.

The kernels run on CUDA, and on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``),
which is how the tests check them against decode-then-matmul.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from typing import Callable, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.errors import OutOfResources
from triton.runtime.interpreter import InterpretedFunction

from .layout import BiLLMPlanes, Factors, GridPlanes, factored
from .tiles import Footprint, Tiles, block_sizes, cdiv, fit_tiles, launch_grid, shrink_below, split_count

# How a tile product is formed (the kernels' DOT constant):
DOT_FP32 = 0  # fp32 inputs: exact fp32 (input_precision="ieee")
DOT_NATIVE = 1  # fp16 / bf16 inputs: tiles in the input's own dtype on the tensor cores, fp32 accumulation
DOT_BF16_EMULATED = 2  # bf16 under the interpreter, whose bf16 dot multiplies the raw bits: operands rounded
# to bf16, multiplied in fp32 (exact: a product of two bf16 values fits fp32's mantissa), fp32 accumulation


@triton.jit
def _accumulate(acc, x, w, BLOCK_T: tl.constexpr, DOT: tl.constexpr):
    """``acc + x (BT, BK) @ w (BR, BK)^T``: for one token ``acc`` is (BR, BK), products summed over K only at
    the end (:func:`_new_acc`, :func:`_store_acc`); else (BT, BR) on ``tl.dot`` tiles (see DOT_*)."""
    if BLOCK_T == 1:
        acc += x.to(tl.float32) * w
    elif DOT == 1:
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    elif DOT == 2:
        acc += tl.dot(x.to(tl.float32), tl.trans(w.to(tl.bfloat16).to(tl.float32)), input_precision="ieee")
    else:
        acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
    return acc


@triton.jit
def _new_acc(BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """The accumulator of :func:`_accumulate`: (BR, BK) for one token (summed over K at the end), else (BT, BR)."""
    if BLOCK_T == 1:
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    return acc  # one return: compiled Triton refuses a helper that returns from both branches


@triton.jit
def _store_acc(ptr, acc, mask, BLOCK_T: tl.constexpr):
    """Store the (BT, BR) sums of an accumulator of :func:`_new_acc` at ``ptr`` (BT, BR)."""
    if BLOCK_T == 1:
        tl.store(ptr, tl.sum(acc, axis=1)[None, :], mask=mask)
    else:
        tl.store(ptr, acc, mask=mask)


@triton.jit
def _grid_columns(cols_ptr, grp, local, GS: tl.constexpr, N, HAS_COLS: tl.constexpr):
    """(input column, mask) of the padded columns ``local`` of group ``grp`` of grid planes over ``N`` columns
    (mapped through ``cols_ptr`` when the planes cover a subset)."""
    j = grp * GS + local  # column among the covered ones
    lmask = (local < GS) & (j < N)
    if HAS_COLS:
        col = tl.load(cols_ptr + j, mask=lmask, other=0)
    else:
        col = j
    return col, lmask


@triton.jit
def _bit(ptr, off, bit, mask):
    """The bits ``bit`` of the bytes at ``ptr + off`` as int32 0 / 1 (0 where masked)."""
    return (tl.load(ptr + off, mask=mask, other=0).to(tl.int32) >> bit) & 1


@triton.jit
def _row_values(ptr, off, rmask):
    """(BR, 1) float32 of per-row values at ``ptr + off``."""
    return tl.load(ptr + off, mask=rmask, other=0.0).to(tl.float32)[:, None]


@triton.jit
def _billm_tile(s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, rows, rmask, R, blk, local, lmask,
                BB: tl.constexpr, HAS_MEANS: tl.constexpr):
    """(BR, BK) float32 weights of rows ``rows`` at the padded columns ``local`` of block ``blk`` (0 where masked),
    from k-major planes (bytes, R) and scales (blocks, 4, R).

    Non-salient: ``select(g, a_s, a_c) * S1 [+ select(g, m_s, m_c)]``; salient: ``(a_1 S1 [+ m_1]) + (a_2 S2
    [+ m_2])``: the format decoder's operations in its order (a product by a sign is a select of +-a).
    """
    byte = blk * BB + local // 8  # (BK,)
    bit = (local % 8)[None, :]
    m2 = rmask[:, None] & lmask[None, :]
    boff = byte[None, :] * R + rows[:, None]  # k-major: neighbouring rows are neighbouring bytes
    b1 = _bit(s1_ptr, boff, bit, m2) == 1
    g = _bit(grp_ptr, boff, bit, m2) == 1
    b2 = _bit(s2_ptr, boff, bit, m2) == 1
    sal = _bit(sal_ptr, byte, local % 8, lmask)[None, :] == 1  # (1, BK)
    soff = blk * 4 * R + rows  # (BR,) slot 0 of this block; slot s at + s R
    a = tl.where(g, _row_values(sc_ptr, soff + R, rmask), _row_values(sc_ptr, soff, rmask))
    w = tl.where(b1, a, -a)
    a1 = _row_values(sc_ptr, soff + 2 * R, rmask)
    a2 = _row_values(sc_ptr, soff + 3 * R, rmask)
    first = tl.where(b1, a1, -a1)
    second = tl.where(b2, a2, -a2)
    if HAS_MEANS:
        w += tl.where(g, _row_values(mu_ptr, soff + R, rmask), _row_values(mu_ptr, soff, rmask))
        first += _row_values(mu_ptr, soff + 2 * R, rmask)
        second += _row_values(mu_ptr, soff + 3 * R, rmask)
    w = tl.where(sal, first + second, w)
    return tl.where(m2, w, 0.0)


@triton.jit
def _grid_tile(planes_ptr, mult_ptr, zero_ptr, shift_ptr, rows, rmask, R, grp, local, lmask, NBYTES,
               BITS: tl.constexpr, GB: tl.constexpr, SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr,
               HAS_SHIFT: tl.constexpr):
    """(BR, BK) float32 weights ``mult * (v - zero) + shift`` of rows ``rows`` at the padded columns ``local`` of
    group ``grp``; ``v`` the code, or ``2 code - 1`` when ``SIGNED`` (0 where masked); from k-major planes
    (bits, bytes, R) and values (groups, R)."""
    byte = grp * GB + local // 8
    bit = (local % 8)[None, :]
    m2 = rmask[:, None] & lmask[None, :]
    boff = byte[None, :] * R + rows[:, None]
    code = tl.zeros(m2.shape, dtype=tl.int32)
    for b in tl.static_range(BITS):
        code += _bit(planes_ptr + b * NBYTES * R, boff, bit, m2) << b
    if SIGNED:
        code = 2 * code - 1
    w = code.to(tl.float32)
    goff = grp * R + rows
    if HAS_ZERO:
        w -= _row_values(zero_ptr, goff, rmask)
    w *= _row_values(mult_ptr, goff, rmask)
    if HAS_SHIFT:
        w += _row_values(shift_ptr, goff, rmask)
    return tl.where(m2, w, 0.0)


@triton.jit
def _billm_kernel(x_ptr, s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, y_ptr,
                  T, R, C, NBYTES, NB, STEPS, stride_xt, stride_ys, stride_yt,
                  BS: tl.constexpr, BB: tl.constexpr, HAS_MEANS: tl.constexpr, DOT: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)  # token tiles on axis 0: the unbounded dimension
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)  # this program's split: blocks STEPS * pid_s ..
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # (BR,)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,)
    xrow = toks.to(tl.int64) * stride_xt  # (BT,) int64: tokens * in_features may pass 2^31
    rmask = rows < R
    tmask = toks < T
    acc = _new_acc(BLOCK_T, BLOCK_R, BLOCK_K)
    for blk in range(pid_s * STEPS, tl.minimum(NB, pid_s * STEPS + STEPS)):
        for k0 in range(0, BB * 8, BLOCK_K):
            local = k0 + tl.arange(0, BLOCK_K)  # padded column within the block (BK,)
            col = blk * BS + local  # input column
            lmask = (local < BS) & (col < C)
            x = tl.load(x_ptr + xrow[:, None] + col[None, :], mask=tmask[:, None] & lmask[None, :], other=0.0)
            w = _billm_tile(s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, rows, rmask, R, blk, local, lmask,
                            BB, HAS_MEANS)
            acc = _accumulate(acc, x, w, BLOCK_T, DOT)
    yoff = pid_s * stride_ys + toks.to(tl.int64)[:, None] * stride_yt + rows[None, :]
    _store_acc(y_ptr + yoff, acc, tmask[:, None] & rmask[None, :], BLOCK_T)


@triton.jit
def _grid_kernel(x_ptr, planes_ptr, mult_ptr, zero_ptr, shift_ptr, cols_ptr, y_ptr,
                 T, R, N, NBYTES, G, STEPS, stride_xt, stride_ys, stride_yt,
                 BITS: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, HAS_COLS: tl.constexpr,
                 SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SHIFT: tl.constexpr, DOT: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    xrow = toks.to(tl.int64) * stride_xt  # (BT,) int64
    rmask = rows < R
    tmask = toks < T
    acc = _new_acc(BLOCK_T, BLOCK_R, BLOCK_K)
    for grp in range(pid_s * STEPS, tl.minimum(G, pid_s * STEPS + STEPS)):
        for k0 in range(0, GB * 8, BLOCK_K):
            local = k0 + tl.arange(0, BLOCK_K)
            col, lmask = _grid_columns(cols_ptr, grp, local, GS, N, HAS_COLS)
            x = tl.load(x_ptr + xrow[:, None] + col[None, :], mask=tmask[:, None] & lmask[None, :], other=0.0)
            w = _grid_tile(planes_ptr, mult_ptr, zero_ptr, shift_ptr, rows, rmask, R, grp, local, lmask, NBYTES,
                           BITS, GB, SIGNED, HAS_ZERO, HAS_SHIFT)
            acc = _accumulate(acc, x, w, BLOCK_T, DOT)
    yoff = pid_s * stride_ys + toks.to(tl.int64)[:, None] * stride_yt + rows[None, :]
    _store_acc(y_ptr + yoff, acc, tmask[:, None] & rmask[None, :], BLOCK_T)


@triton.jit
def _billm_decode_kernel(s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, w_ptr, R, C, NBYTES, NB, stride_w,
                         BS: tl.constexpr, BB: tl.constexpr, HAS_MEANS: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    blk = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    for k0 in range(0, BB * 8, BLOCK_K):
        local = k0 + tl.arange(0, BLOCK_K)
        col = blk * BS + local
        lmask = (local < BS) & (col < C)
        w = _billm_tile(s1_ptr, grp_ptr, s2_ptr, sal_ptr, sc_ptr, mu_ptr, rows, rmask, R, blk, local, lmask,
                        BB, HAS_MEANS)
        woff = rows.to(tl.int64)[:, None] * stride_w + col[None, :]
        tl.store(w_ptr + woff, w.to(w_ptr.dtype.element_ty), mask=rmask[:, None] & lmask[None, :])


@triton.jit
def _grid_decode_kernel(planes_ptr, mult_ptr, zero_ptr, shift_ptr, cols_ptr, w_ptr, R, N, NBYTES, G, stride_w,
                        BITS: tl.constexpr, GS: tl.constexpr, GB: tl.constexpr, HAS_COLS: tl.constexpr,
                        SIGNED: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_SHIFT: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_r = tl.program_id(0)
    grp = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    for k0 in range(0, GB * 8, BLOCK_K):
        local = k0 + tl.arange(0, BLOCK_K)
        col, lmask = _grid_columns(cols_ptr, grp, local, GS, N, HAS_COLS)
        w = _grid_tile(planes_ptr, mult_ptr, zero_ptr, shift_ptr, rows, rmask, R, grp, local, lmask, NBYTES,
                       BITS, GB, SIGNED, HAS_ZERO, HAS_SHIFT)
        woff = rows.to(tl.int64)[:, None] * stride_w + col[None, :]
        tl.store(w_ptr + woff, w.to(w_ptr.dtype.element_ty), mask=rmask[:, None] & lmask[None, :])


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


def _interpreted() -> bool:
    return isinstance(_billm_kernel, InterpretedFunction)


def device_smem_limit(device: torch.device) -> Optional[int]:
    """Shared memory one program may use on ``device`` (bytes), None where there is no such limit (the interpreter)."""
    if device.type != "cuda" or _interpreted():
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[0]


def device_programs(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of ``device``: what the split-K choice fills (None off CUDA: one split per program
    of the interpreter is as good as any)."""
    if device.type != "cuda" or _interpreted():
        return None
    return _cuda_props(device.index if device.index is not None else torch.cuda.current_device())[1]


@functools.lru_cache(maxsize=None)
def _cuda_props(index: int) -> tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    try:  # what Triton itself checks a launch against
        smem = int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except (AttributeError, KeyError, RuntimeError):
        smem = int(getattr(props, "shared_memory_per_block_optin", 0) or props.shared_memory_per_block)
    return smem, int(props.multi_processor_count)


def footprint(x: Tensor, layout) -> Footprint:
    """Bytes a K step of the kernel for ``layout`` loads per tile element (see :mod:`.tiles`); scales are loaded
    once per row and block, not per element."""
    if isinstance(layout, BiLLMPlanes):
        return Footprint(per_weight=3, per_input=x.element_size(), per_column=1)  # s1, grp, s2; sal
    bits = max(p.planes.shape[0] for p in layout)
    has_cols = any(p.cols is not None for p in layout)
    return Footprint(per_weight=bits, per_input=x.element_size(), per_column=8 if has_cols else 0)


def _steps(layout) -> list[tuple[int, int]]:
    """(blocks or groups, padded columns of each) of each part of ``layout``: the K loop of its kernel."""
    if isinstance(layout, BiLLMPlanes):
        return [(layout.scales.shape[1], (layout.blocksize + 7) // 8 * 8)]
    return [(p.scale.shape[1], p.group_bytes * 8) for p in layout]


_KMAJOR: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def kmajor(t: Tensor, make: Callable[[Tensor], Tensor]) -> Tensor:
    """``make(t)``, the k-major copy of a layout tensor the kernels read, made once per tensor (and again
    after ``t`` changes in place), dropped when ``t`` is freed.

    The stored planes run along each row's columns; the kernels read them column block by column block
    for many rows at once, so neighbouring rows must be neighbouring bytes: (bytes, rows). The copy is
    packed too (the same bits, transposed): a layer holds its packed bytes twice on the GPU, and nothing
    decoded.
    """
    key = id(t)
    hit = _KMAJOR.get(key)
    if hit is not None and hit[0]() is t and hit[1] == t._version:
        return hit[2]
    out = make(t)
    _KMAJOR[key] = (weakref.ref(t, lambda _, k=key: _KMAJOR.pop(k, None)), t._version, out)
    return out


def _t2(t: Tensor) -> Tensor:
    return t.t().contiguous()


def _billm_kmajor(p: BiLLMPlanes) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(s1, grp, s2) as (bytes, R); scales and means as (blocks, 4, R)."""
    slots = lambda t: t.permute(1, 2, 0).contiguous()  # noqa: E731
    return (kmajor(p.s1, _t2), kmajor(p.grp, _t2), kmajor(p.s2, _t2), kmajor(p.scales, slots),
            kmajor(p.means, slots) if p.means is not None else None)


def _grid_kmajor(p: GridPlanes) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, bool, bool]:
    """(planes (bits, bytes, R), mult, zero, shift (groups, R); signed, has zero, has shift); any pointer where unused.

    Raises:
        ValueError: planes without their exact values (every built-in format gives them).
    """
    v = p.values
    if v is None:
        raise ValueError("grid planes without exact values (GridValues): decode with the format instead")
    planes = kmajor(p.planes, lambda t: t.transpose(1, 2).contiguous())
    mult = kmajor(v.mult, _t2)
    zero = kmajor(v.zero, _t2) if v.zero is not None else mult
    shift = kmajor(v.shift, _t2) if v.shift is not None else mult
    return planes, mult, zero, shift, v.signed, v.zero is not None, v.shift is not None


def triton_matmul(x: Tensor, layout, blocks: Optional[tuple[int, int, int]] = None,
                  splits: Optional[int] = None, warps: Optional[int] = None) -> Tensor:
    """``x`` (T, in) -> (T, out) float32 with the Triton kernels (CUDA, or the interpreter on CPU).

    ``blocks``: (BLOCK_T, BLOCK_R, BLOCK_K) wanted instead of :func:`block_sizes`; ``splits``: how many programs
    share a row tile's blocks (default :func:`split_count`); ``warps``: per program (tests, benchmarks).
    Either way the tiles are shrunk to fit the device's shared memory (:func:`billm.kernels.tiles.fit_tiles`),
    and a launch that still runs out of it is retried with smaller tiles.
    """
    if isinstance(layout, Factors):  # two products of rank r
        return factored(x, layout, lambda h, part: triton_matmul(h, part, blocks, splits, warps))
    x = x.contiguous()
    T = x.shape[0]
    R = layout.rows if isinstance(layout, BiLLMPlanes) else layout[0].rows
    fp = footprint(x, layout)
    wanted = Tiles(*(blocks or block_sizes(T, R)))
    if warps is not None:
        wanted = Tiles(wanted.t, wanted.r, wanted.k, wanted.stages, warps)
    tiles = fit_tiles(wanted, fp, device_smem_limit(x.device))
    parts = _steps(layout)
    programs = cdiv(T, tiles.t) * cdiv(R, tiles.r)
    per_part = [split_count(programs, n, device_programs(x.device), splits) for n, _ in parts]
    S = sum(s for s, _ in per_part)
    buf = torch.empty(S, T, R, dtype=torch.float32, device=x.device)  # each split's partial sums
    with launch_guard(x.device):
        launch_fitted(lambda t: _launch(x, layout, buf, t, per_part), tiles, fp)
    return buf[0] if S == 1 else buf.sum(0)


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


def _block_k(tiles: Tiles, padded: int) -> int:
    """The K tile of a part whose blocks hold ``padded`` columns: no wider than a block (rounded up to a power of 2)."""
    return max(16, min(tiles.k, triton.next_power_of_2(padded)))


def _launch(x: Tensor, layout, buf: Tensor, tiles: Tiles, per_part: list[tuple[int, int]]) -> None:
    """Every part's kernel; part ``i`` writes splits ``sum(S_<i) ..`` of ``buf`` (S, T, R)."""
    first = 0
    for i, (S, steps) in enumerate(per_part):
        grid = launch_grid(x.shape[0], buf.shape[2], tiles.blocks) + (S,)
        y = buf[first:first + S]
        if isinstance(layout, BiLLMPlanes):
            _launch_billm(x, layout, y, grid, tiles, steps)
        else:
            _launch_grid(x, layout[i], y, grid, tiles, steps)
        first += S


def _launch_billm(x: Tensor, p: BiLLMPlanes, y: Tensor, grid, tiles: Tiles, steps: int) -> None:
    _check_device(x, p.s1)
    s1, grp, s2, sc, mu = _billm_kmajor(p)
    bb = (p.blocksize + 7) // 8
    _billm_kernel[grid](x, s1, grp, s2, p.sal, sc, mu if mu is not None else sc, y, x.shape[0], p.rows, p.cols,
                        p.s1.shape[1], p.scales.shape[1], steps, x.stride(0), y.stride(0), y.stride(1),
                        BS=p.blocksize, BB=bb, HAS_MEANS=mu is not None, DOT=dot_mode(x.dtype, _interpreted()),
                        BLOCK_T=tiles.t, BLOCK_R=tiles.r, BLOCK_K=_block_k(tiles, bb * 8), num_stages=tiles.stages,
                        num_warps=tiles.warps)


def _launch_grid(x: Tensor, p: GridPlanes, y: Tensor, grid, tiles: Tiles, steps: int) -> None:
    _check_device(x, p.planes)
    cols = p.cols if p.cols is not None else p.scale  # any pointer when unused
    planes, mult, zero, shift, signed, has_zero, has_shift = _grid_kmajor(p)
    _grid_kernel[grid](x, planes, mult, zero, shift, cols, y, x.shape[0], p.rows, p.n, p.planes.shape[2],
                       p.scale.shape[1], steps, x.stride(0), y.stride(0), y.stride(1), BITS=p.planes.shape[0],
                       GS=p.groupsize, GB=p.group_bytes, HAS_COLS=p.cols is not None, SIGNED=signed,
                       HAS_ZERO=has_zero, HAS_SHIFT=has_shift, DOT=dot_mode(x.dtype, _interpreted()),
                       BLOCK_T=tiles.t, BLOCK_R=tiles.r, BLOCK_K=_block_k(tiles, p.group_bytes * 8),
                       num_stages=tiles.stages, num_warps=tiles.warps)


DECODE_TILES = (64, 32)
"""(rows, columns) of the weight one step of a :func:`triton_decode` program writes (a program: one block or group
of columns)."""


def triton_decode(layout, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """The (rows, cols) weight of ``layout`` in ``dtype``, decoded by Triton in one pass (CUDA, or the interpreter):
    it reads the packed planes and writes the weight once. Bit for bit :func:`billm.kernels.decode.decode_weight`
    (rounded to ``dtype``) under the interpreter.

    Raises:
        ValueError: a layout whose columns do not match ``cols``, or grid planes without exact values.
    """
    if isinstance(layout, Factors):  # each factor decoded by Triton, then the format's own product
        from .decode import factors_weight

        u = triton_decode(layout.second, layout.first[0].rows)  # (out, r) +-1
        return factors_weight(u, triton_decode(layout.first, cols), layout).to(dtype)
    if isinstance(layout, BiLLMPlanes):
        if layout.cols != cols:
            raise ValueError(f"BiLLM planes of {layout.cols} columns, the weight has {cols}")
        dev, R = layout.s1.device, layout.rows
    else:
        if sum(p.n for p in layout) != cols:
            raise ValueError(f"the grid planes cover {sum(p.n for p in layout)} columns, the weight has {cols}")
        dev, R = layout[0].planes.device, layout[0].rows
    w = torch.empty(R, cols, dtype=dtype, device=dev)
    BR, BK = DECODE_TILES
    with launch_guard(dev):
        if isinstance(layout, BiLLMPlanes):
            p = layout
            s1, grp, s2, sc, mu = _billm_kmajor(p)
            bb = (p.blocksize + 7) // 8
            _billm_decode_kernel[(cdiv(R, BR), p.scales.shape[1])](
                s1, grp, s2, p.sal, sc, mu if mu is not None else sc, w, R, cols, p.s1.shape[1], p.scales.shape[1],
                w.stride(0), BS=p.blocksize, BB=bb, HAS_MEANS=mu is not None, BLOCK_R=BR,
                BLOCK_K=max(16, min(BK, triton.next_power_of_2(bb * 8))))
            return w
        for part in layout:
            planes, mult, zero, shift, signed, has_zero, has_shift = _grid_kmajor(part)
            colmap = part.cols if part.cols is not None else mult
            _grid_decode_kernel[(cdiv(R, BR), part.scale.shape[1])](
                planes, mult, zero, shift, colmap, w, R, part.n, part.planes.shape[2], part.scale.shape[1],
                w.stride(0), BITS=part.planes.shape[0], GS=part.groupsize, GB=part.group_bytes,
                HAS_COLS=part.cols is not None, SIGNED=signed, HAS_ZERO=has_zero, HAS_SHIFT=has_shift, BLOCK_R=BR,
                BLOCK_K=max(16, min(BK, triton.next_power_of_2(part.group_bytes * 8))))
    return w
