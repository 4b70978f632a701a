"""Tile sizes of the Triton kernels that fit the device: pure arithmetic, no Triton import.

A compiled Triton kernel keeps ``num_stages`` copies of every tile its loop loads in shared memory
(software pipelining) and, for ``tl.dot``, the two operand tiles once more. Tiles that a large GPU
holds can exceed a smaller one's limit (the H200's is 232,448 bytes a block): BiLLM's prompt kernel
with 16 x 32 x 128 tiles, fp32 inputs and means asked for 294,912 and failed with
``OutOfResources``. So every launch estimates its footprint (:func:`smem_estimate`) and shrinks its
tiles until the estimate, with a margin, fits the device's limit (:func:`fit_tiles`); a launch
that still fails for shared memory is retried smaller (``triton_kernels``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import BillmError

WAVES = 16
"""Programs a launch aims for per streaming multiprocessor: a decoding step splits each row tile's blocks among
this many times more programs than the GPU has SMs (split-K), so loads from many programs are in flight
at once. ``benchmarks/bench_kernels.py --tune`` measures the choice."""
MAX_ROW_TILES = 65535  # CUDA's limit on grid axis 1
DEFAULT_STAGES = 3
"""Pipeline stages a launch asks for first (Triton's default on CUDA)."""
SMEM_MARGIN = 1.25
"""The estimate must fit the limit with this factor: it counts the loaded tiles, not Triton's every buffer
(the failing H200 launch needed 1.04x the estimate)."""
MIN_BLOCK_K = 16  # tl.dot needs K >= 16


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class Footprint:
    """Bytes one step of a kernel's K loop loads, per element of each tile.

    Attributes:
        per_weight: per (row, column) element of the weight tile (bit planes, gathered scales).
        per_input: per (token, column) element of the activation tile (the input's element size).
        per_column: per column (column masks, column maps).
    """

    per_weight: int
    per_input: int
    per_column: int = 0


@dataclass(frozen=True)
class Tiles:
    """One launch's tiles: ``t`` tokens x ``r`` rows, ``k`` columns a loop step, ``stages`` pipeline stages."""

    t: int
    r: int
    k: int
    stages: int = DEFAULT_STAGES
    warps: int = 4

    @property
    def blocks(self) -> tuple[int, int, int]:
        return (self.t, self.r, self.k)


def smem_estimate(fp: Footprint, tiles: Tiles) -> int:
    """Shared-memory bytes of one program: ``stages`` copies of each loaded tile, plus fp32 ``tl.dot`` operands."""
    step = tiles.r * tiles.k * fp.per_weight + tiles.t * tiles.k * fp.per_input + tiles.k * fp.per_column
    dot = (tiles.t * tiles.k + tiles.r * tiles.k) * 4 if tiles.t > 1 else 0
    return tiles.stages * step + dot


def fits(fp: Footprint, tiles: Tiles, limit: Optional[int]) -> bool:
    """Whether ``tiles`` fit ``limit`` bytes of shared memory with :data:`SMEM_MARGIN` (None: no limit)."""
    return limit is None or smem_estimate(fp, tiles) * SMEM_MARGIN <= limit


def fit_tiles(wanted: Tiles, fp: Footprint, limit: Optional[int]) -> Tiles:
    """``wanted``, or the first smaller tiles that fit ``limit`` (None: no limit, ``wanted`` as it is).

    Order: halve ``k`` down to 16 at the wanted stages; then one stage fewer (from the wanted ``k``
    again), down to one stage; then halve the row block (down to 16 for ``tl.dot`` tiles, 1 for a GEMV).

    Raises:
        BillmError: not even the smallest tiles fit.
    """
    if fits(fp, wanted, limit):
        return wanted
    min_r = 16 if wanted.t > 1 else 1
    r = wanted.r
    while r >= min_r:
        for stages in range(wanted.stages, 0, -1):
            k = wanted.k
            while k >= MIN_BLOCK_K:
                t = Tiles(wanted.t, r, k, stages, wanted.warps)
                if fits(fp, t, limit):
                    return t
                k //= 2
        r //= 2
    smallest = Tiles(wanted.t, min_r, MIN_BLOCK_K, 1, wanted.warps)
    raise BillmError(f"no Triton tiles fit {limit} bytes of shared memory: even {smallest.blocks} with one stage "
                     f"needs about {smem_estimate(fp, smallest)} (x{SMEM_MARGIN} margin)")


def shrink_below(tiles: Tiles, fp: Footprint) -> Optional[Tiles]:
    """The next smaller tiles after a launch of ``tiles`` ran out of shared memory (None: none smaller)."""
    try:
        return fit_tiles(tiles, fp, int(smem_estimate(fp, tiles) * SMEM_MARGIN) - 1)
    except BillmError:
        return None


def block_sizes(T: int, R: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_R, BLOCK_K) wanted for ``T`` tokens and ``R`` rows, before fitting the device.

    The kernels read k-major planes, a thread a row: tiles are tall in rows and narrow in columns, so a
    thread's column loop and sums stay in its registers. One token: a GEMV over 128 rows, 32 columns a
    step (the programs a small layer lacks come from splitting its blocks, :func:`split_count`). More:
    16-token ``tl.dot`` tiles (it needs >= 16 on each side) over 64 rows. The K tile is cut to the
    format's block or group by the kernels.
    """
    if T == 1:
        bt, br, bk = 1, 128, 32
    else:
        bt, br, bk = 16, 64, 32
    while cdiv(R, br) > MAX_ROW_TILES:
        br *= 2
    return bt, br, bk


def split_count(programs: int, steps: int, sms: Optional[int], wanted: Optional[int] = None) -> tuple[int, int]:
    """(splits, steps a split) for a launch of ``programs`` row and token tiles over ``steps`` blocks.

    ``wanted`` splits when given; else enough for :data:`WAVES` programs per SM of a GPU of ``sms``
    SMs, and one where ``sms`` is None (the interpreter). Never more splits than blocks; every split but
    the last walks the same number of blocks.
    """
    if wanted is not None:
        s = wanted
    elif sms is None:
        s = 1
    else:
        s = cdiv(WAVES * sms, max(programs, 1))
    s = max(1, min(s, steps))
    per = cdiv(steps, s) if steps else 1
    return (cdiv(steps, per) if steps else 1), per


def launch_grid(T: int, R: int, blocks: tuple[int, int, int]) -> tuple[int, int]:
    """(token tiles, row tiles): tokens on axis 0 (up to 2^31 - 1), rows on axis 1 (at most 65535)."""
    BT, BR, _ = blocks
    grid = (cdiv(T, BT), cdiv(R, BR))
    if grid[1] > MAX_ROW_TILES:
        raise ValueError(f"{R} rows in blocks of {BR} need {grid[1]} row tiles; CUDA allows {MAX_ROW_TILES}")
    return grid
