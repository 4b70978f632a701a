"""The whole weight from its layout, fast and exact: the ``dense`` path's decoder (decode, then a dense matmul).

The formats' own decoders (``Format.decode``) are the reference: readable, but they unpack every
bit to a bool, expand every per-block scale to a full (rows, cols) tensor and select among them,
a dozen passes over the weight. For a long prompt that decode dominates the call (60 % of a
perplexity run). This decoder reads the column-aligned planes of the layout (:mod:`.layout`) and:

* turns bytes into 8 values at once with ``F.embedding`` over tables of 256 rows (a byte indexes a
  row of 8 float32 values): one pass that reads 1 bit a weight a plane and writes 4 bytes;
* applies per-row, per-group scales as broadcast views (rows, groups, 1), never expanded;
* works on chunks of rows of about :data:`CHUNK_ELEMENTS` weights on the CPU, so the temporaries of a
  chunk stay in cache (one chunk: every row, on CUDA).

Every value is computed by the same float32 operations, in the same order, as the format's
decoder, so the weight is bit for bit the same (``tests/test_decode.py`` checks ``torch.equal``
for every format with a layout). The weight exists only during the call that decodes it.

BiLLM, per row and block with scales ``a`` and means ``m`` of the concentrated (c), sparse (s) and
salient (1, 2) groups, ``S1``/``S2`` the +-1 signs, ``g`` the sparse-group bit:

    non-salient column:  w = (a_c (1 - g) + a_s g) S1  [+ m_c (1 - g) + m_s g]
    salient column:      w = (a_1 S1 [+ m_1]) + (a_2 S2 [+ m_2])

A product by 0 or 1 and a sum with 0 are exact, so the first line is the reference's
``select(g, a_s, a_c) * S1 + select(g, m_s, m_c)`` with its one rounding. (A ``torch.where`` on a
broadcast scale is about 5x slower on the CPU than these multiply-adds.) The tables are indexed by
one byte (256 rows, in L1); tables of two bytes (65536 rows) measured 5x slower a lookup, out of
cache. Salient columns (a few percent) are computed apart and written over.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .layout import BiLLMPlanes, Factors, GridPlanes

CHUNK_ELEMENTS = 1 << 15
"""Weights decoded at a time on the CPU: PyTorch's parallel grain, so a chunk's operations run serially
(see :func:`for_chunks`), and its temporaries (about 20 bytes a weight) stay in the L2 cache."""

_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def _bits(values: Tensor) -> Tensor:
    """(V, 8) long: bit ``j`` of each value."""
    return (values.unsqueeze(1) >> torch.arange(8, device=values.device)) & 1


def table(name: str, device: torch.device) -> Tensor:
    """A byte table (256, 8) float32, made once per device: row ``v`` holds a value for each bit ``j`` of byte ``v``.

    ``sign``: +1. where the bit is set, else -1. ``code1``: 1. / 0. ``not1``: 0. / 1.
    """
    key = (name, device)
    if key not in _TABLES:
        make = {"sign": lambda b: b * 2 - 1, "code1": lambda b: b, "not1": lambda b: 1 - b}
        if name not in make:
            raise KeyError(f"no byte table {name!r}")
        _TABLES[key] = make[name](_bits(torch.arange(256, device=device))).float().contiguous()
    return _TABLES[key]


def lookup(name: str, index: Tensor) -> Tensor:
    """(..., m) byte indices (long) -> (..., 8 m) float32 table values."""
    out = F.embedding(index, table(name, index.device))  # (..., m, 8)
    return out.view(*index.shape[:-1], index.shape[-1] * 8)


def chunk_rows(rows: int, width: int, device: torch.device) -> int:
    """Rows a chunk holds: about :data:`CHUNK_ELEMENTS` weights on the CPU, all of them elsewhere."""
    if device.type != "cpu":
        return max(rows, 1)
    return max(1, min(rows, CHUNK_ELEMENTS // max(width, 1)))


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_SIZE = 0


def for_chunks(rows: int, width: int, device: torch.device, fn: Callable[[int, int], None]) -> None:
    """``fn(r0, r1)`` for each chunk of rows (:func:`chunk_rows`); on the CPU the chunks are spread over
    ``torch.get_num_threads()`` Python threads.

    A chunk is no larger than PyTorch's parallel grain (32768 elements), so each of its operations runs
    on its own thread, and the chunks run side by side. The other way, every operation split over the
    threads, waits at a barrier per operation: on a loaded machine that made the decode 6x slower on
    two threads than on one (``benchmarks/bench_prompt.py``).
    """
    global _POOL, _POOL_SIZE
    step = chunk_rows(rows, width, device)
    starts = range(0, rows, step)
    workers = min(torch.get_num_threads(), len(starts)) if device.type == "cpu" else 1
    if workers <= 1:
        for r0 in starts:
            fn(r0, min(rows, r0 + step))
        return
    if _POOL is None or _POOL_SIZE < workers:
        _POOL, _POOL_SIZE = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="billm-decode"), workers
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def run(r0: int) -> None:  # the caller's modes are thread-local: a tensor made under inference_mode is
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):  # written under it too
            fn(r0, min(rows, r0 + step))

    for f in [_POOL.submit(run, r0) for r0 in starts]:
        f.result()  # re-raises a chunk's error


def padded_columns(cols: int, group: int, group_bytes: int, device: torch.device) -> Optional[Tensor]:
    """(cols,) the padded position of each column when groups of ``group`` columns start on bytes
    (``group_bytes`` each); None when the positions are the columns themselves."""
    if group == group_bytes * 8:
        return None
    j = torch.arange(cols, device=device)
    return (j // group) * group_bytes * 8 + j % group


def billm_weight(p: BiLLMPlanes) -> Tensor:
    """The (rows, cols) float32 weight of BiLLM planes, bit for bit the format's decode."""
    r, nbytes = p.s1.shape
    bb = (p.blocksize + 7) // 8
    nb = p.scales.shape[1]
    width = nbytes * 8  # padded columns, nb blocks of bb * 8
    dev = p.s1.device
    pos = padded_columns(p.cols, p.blocksize, bb, dev)
    sal = torch.nonzero(lookup("code1", p.sal.long()) > 0).squeeze(1)  # (k,) padded salient columns
    sal_byte, sal_bit, sal_blk = sal // 8, sal % 8, sal // (bb * 8)
    out = torch.empty(r, width, dtype=torch.float32, device=dev)  # padded columns; the real ones returned

    def chunk(r0: int, r1: int) -> None:
        R = r1 - r0
        sc = p.scales[r0:r1].float()  # (R, nb, 4)
        mu = p.means[r0:r1].float() if p.means is not None else None
        g = p.grp[r0:r1].long()  # (R, nbytes)
        sparse = lookup("code1", g).view(R, nb, bb * 8)  # 1. on the sparse group, else 0.
        conc = lookup("not1", g).view(R, nb, bb * 8)  # its complement
        w = out[r0:r1].view(R, nb, bb * 8)
        torch.mul(conc, sc[:, :, 0:1], out=w).addcmul_(sparse, sc[:, :, 1:2])  # a_c or a_s (plus an exact 0)
        s1 = lookup("sign", p.s1[r0:r1].long())  # (R, width) +-1
        w.mul_(s1.view(R, nb, bb * 8))
        if mu is not None:
            w.addcmul_(conc, mu[:, :, 0:1]).addcmul_(sparse, mu[:, :, 1:2])
        if sal.numel():  # (R, k) on the salient columns, written over
            s2 = ((p.s2[r0:r1].index_select(1, sal_byte) >> sal_bit) & 1).float().mul_(2).sub_(1)
            first = sc[:, :, 2].index_select(1, sal_blk).mul_(s1.index_select(1, sal))
            second = sc[:, :, 3].index_select(1, sal_blk).mul_(s2)
            if mu is not None:
                first.add_(mu[:, :, 2].index_select(1, sal_blk))
                second.add_(mu[:, :, 3].index_select(1, sal_blk))
            out[r0:r1].index_copy_(1, sal, first.add_(second))

    for_chunks(r, width, dev, chunk)
    return out[:, :p.cols] if pos is None else out.index_select(1, pos)


def grid_weight(layout: list[GridPlanes], cols: int) -> Tensor:
    """The (rows, cols) float32 weight of grid planes (each with its :class:`~.layout.GridValues`), bit for bit
    the format's decode.

    Raises:
        ValueError: planes without exact values (a format that gave none), or that leave columns uncovered.
    """
    if any(p.values is None for p in layout):
        raise ValueError("grid planes without exact values (GridValues): decode with the format instead")
    covered = sum(p.n for p in layout)
    if covered != cols:
        raise ValueError(f"the grid planes cover {covered} columns, the weight has {cols}")
    p0 = layout[0]
    dev = p0.planes.device
    if len(layout) == 1 and p0.cols is None:  # one width over every column: decoded in place, padding cut by a view
        width = p0.planes.shape[2] * 8
        out = torch.empty(p0.rows, width, dtype=torch.float32, device=dev)
        for_chunks(p0.rows, width, dev, lambda r0, r1: _grid_chunk(out[r0:r1], p0, r0, r1))
        pos = padded_columns(p0.n, p0.groupsize, p0.group_bytes, dev)
        return out[:, :cols] if pos is None else out.index_select(1, pos)
    groups = [whole_groups(p, cols) for p in layout]
    if all(g is not None for g in groups):  # whole groups (SliM-LLM's widths): each copied a group at a time
        gs = p0.groupsize
        out = torch.empty(p0.rows, -(-cols // gs) * gs, dtype=torch.float32, device=dev)  # the last group padded
        for p, g in zip(layout, groups):
            _grid_groups(out, p, g)
        return out[:, :cols]
    out = torch.empty(p0.rows, cols, dtype=torch.float32, device=dev)
    for p in layout:
        _grid_columns(out, p)
    return out


def _codes(planes: Tensor) -> Tensor:
    """(bits, R, m) uint8 bit planes -> (R, 8 m) float32 codes, a lookup a plane."""
    codes = lookup("code1", planes[0].long())
    for b in range(1, planes.shape[0]):
        codes.add_(lookup("code1", planes[b].long()), alpha=float(1 << b))  # small integers: exact
    return codes


def _grid_chunk(out: Tensor, p: GridPlanes, r0: int, r1: int) -> None:
    """Decode rows ``r0:r1`` of ``p`` into ``out`` (r1 - r0, padded columns of p)."""
    R, G, gb, v = r1 - r0, p.scale.shape[1], p.group_bytes, p.values
    planes = p.planes[:, r0:r1]
    w = out.view(R, G, gb * 8)
    w.copy_((lookup("sign", planes[0].long()) if v.signed else _codes(planes)).view(R, G, gb * 8))
    if v.zero is not None:
        w.sub_(v.zero[r0:r1, :, None])
    w.mul_(v.mult[r0:r1, :, None])
    if v.shift is not None:
        w.add_(v.shift[r0:r1, :, None])


def whole_groups(p: GridPlanes, cols: int) -> Optional[Tensor]:
    """(G,) the group of the weight (of ``p.groupsize`` columns; the last may be short) that each group of ``p``
    is, when ``p`` covers whole groups and its planes hold each on whole bytes (SliM-LLM's widths); else None."""
    gs = p.groupsize
    if p.cols is None or gs != p.group_bytes * 8 or p.planes.shape[2] * 8 != p.scale.shape[1] * gs:
        return None
    j = torch.arange(p.n, device=p.cols.device)
    groups = p.cols[::gs] // gs  # (G,) the group of each one's first column
    if groups.numel() != p.scale.shape[1] or not torch.equal(p.cols, groups[j // gs] * gs + j % gs):
        return None
    return groups


def _grid_groups(out: Tensor, p: GridPlanes, groups: Tensor) -> None:
    """Decode ``p`` into its whole groups of ``out`` (rows, groups x groupsize), a chunk of rows at a time."""
    r, nbytes = p.planes.shape[1:]
    gs = p.groupsize

    def chunk(r0: int, r1: int) -> None:
        w = torch.empty(r1 - r0, nbytes * 8, dtype=torch.float32, device=out.device)
        _grid_chunk(w, p, r0, r1)
        out[r0:r1].view(r1 - r0, -1, gs).index_copy_(1, groups, w.view(r1 - r0, -1, gs))  # a run of gs floats each

    for_chunks(r, nbytes * 8, out.device, chunk)


def _grid_columns(out: Tensor, p: GridPlanes) -> None:
    """Decode ``p`` into its columns of ``out`` (rows, cols), a chunk of rows at a time (any grouping)."""
    r, nbytes = p.planes.shape[1:]
    pos = padded_columns(p.n, p.groupsize, p.group_bytes, out.device)
    cols = p.cols if p.cols is not None else torch.arange(p.n, device=out.device)

    def chunk(r0: int, r1: int) -> None:
        w = torch.empty(r1 - r0, nbytes * 8, dtype=torch.float32, device=out.device)
        _grid_chunk(w, p, r0, r1)
        out[r0:r1].index_copy_(1, cols, w[:, :p.n] if pos is None else w.index_select(1, pos))

    for_chunks(r, nbytes * 8, out.device, chunk)


def factors_values(u: Tensor, v: Tensor, s_out: Tensor, s_in: Tensor) -> Tensor:
    """(out, in) float32 ``(s_out * (U V)) * s_in`` from float +-1 factors u (out, r), v (r, in) and the float32
    scales (out,), (in,): the low-rank format's decode (``U V`` of +-1 entries is an exact integer in float32)."""
    return (s_out[:, None] * (u @ v)) * s_in[None, :]


def factors_weight(u: Tensor, v: Tensor, layout: Factors) -> Tensor:
    """:func:`factors_values` of the decoded factors u (out, r), v (r, in) with the layout's scales."""
    return factors_values(u, v, layout.s_out.float(), layout.s_in.float())


def can_decode(layout) -> bool:
    """Whether :func:`decode_weight` can decode ``layout`` exactly (BiLLM planes; grid planes with their values;
    factors of such)."""
    if isinstance(layout, BiLLMPlanes):
        return True
    if isinstance(layout, Factors):
        return can_decode(layout.first) and can_decode(layout.second)
    return isinstance(layout, list) and bool(layout) and all(isinstance(p, GridPlanes) and p.values is not None
                                                             for p in layout)


def decode_weight(layout, cols: int) -> Tensor:
    """The (rows, cols) float32 weight of a layout, bit for bit its format's decode (see the module docstring).

    Raises:
        ValueError: a layout :func:`can_decode` rejects.
    """
    if isinstance(layout, BiLLMPlanes):
        if layout.cols != cols:
            raise ValueError(f"BiLLM planes of {layout.cols} columns, the weight has {cols}")
        return billm_weight(layout)
    if isinstance(layout, Factors):
        return factors_weight(decode_weight(layout.second, layout.first[0].rows), decode_weight(layout.first, cols),
                              layout)
    if not isinstance(layout, list) or not layout or not all(isinstance(p, GridPlanes) for p in layout):
        raise ValueError(f"not a layout: {type(layout).__name__}")
    return grid_weight(layout, cols)
