"""SliM-LLM: GPTQ with salience-driven mixed precision per group of input columns.

Two additions to GPTQ on the shared OBC loop, both driven by the Hessian salience
``delta_ij = w_ij^2 / U_jj^2`` (``U = chol(H^-1)``, upper, the same metric BiLLM uses):

* **SBA** (salience-determined bit allocation). The input columns are cut into groups of
  ``groupsize``. Each full group gets a salience, the sum of its ``delta``. For an average of ``N``
  bits, the ``k`` most salient groups get ``N + 1`` bits and the ``k`` least salient get ``N - 1``,
  so the layer's average stays exactly ``N``. (Beyond SliM-LLM: an ``average`` below ``N`` first
  lowers the least salient full groups to ``N - 1``, as few as bring the layer's width to it or
  under; the pairs then move among the rest.) ``k`` (0 included) is chosen for the least error of
  the rounded weights: by default GPTQ's per-column loss ``sum (w - q)^2 / U_jj^2``, the part of
  each column's error that compensation cannot remove (``sba_error="diag"``), or the output error
  ``tr(D H D^T)``, which ignores the compensation that follows (``"output"``). A partial last
  group stays at ``N``, and bits only flow from a strictly less salient group to a more salient one.
* **SQC** (salience-weighted quantizer calibration). Each row of each group picks the clipping of
  its asymmetric range that minimises ``sum omega (w - q)^2``. ``omega`` is ``1 + tau`` on the
  weights that are salient within the group row (``delta > mean + 3 std``) and 1 elsewhere.
  Not clipping is one of the candidates.

Widths are per group of columns, so the bit map costs one small integer per ``groupsize`` columns.
"""

from __future__ import annotations

from dataclasses import dataclass
import enum
import math
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, check, option
from ..kernels.bitpack import pack_codes, packed_len, unpack_codes
from ..kernels.layout import GridValues, Layout, grid_planes
from ..packing.formats import FieldSpec, Format, Meta, Shape, StoredWeight, Tensors, per_column, register_format, scale_dtype
from .gptq import Calibrate, GridColumns, gptq_weight
from .obc import OBCTimes
from .registry import WeightResult, register_method
from .rtn import GridConfig, grid_groups, grid_index, grid_values, minmax_params, quantize_minmax, range_params


# ----------------------------------------------------------------------------- config

class SBAError(str, enum.Enum):
    """What SliM-LLM's bit allocation minimises when it chooses how many groups move."""

    DIAG = "diag"  # GPTQ's per-column loss sum (w - q)^2 / U_jj^2 of the rounded weights
    OUTPUT = "output"  # the full tr(D H D^T) of the rounded weights




@dataclass(frozen=True)
class SliMConfig(GridConfig):
    """SliM-LLM: GPTQ with salience-driven mixed precision per group of input columns.

    ``bits`` is the layer's average width; groups of ``groupsize`` columns get ``bits - 1``,
    ``bits`` or ``bits + 1``. SBA ranks the groups by summed salience ``w^2 / U_jj^2`` and moves a
    bit from the ``k`` least to the ``k`` most salient, ``k`` chosen for the least ``sba_error`` of
    the rounding. SQC picks each group row's clipping for the least ``sum omega (w - q)^2``,
    ``omega = 1 + tau`` on locally salient weights (salience above mean + 3 std), 1 elsewhere.
    ``sba_error``: ``diag`` (default) scores a choice by the loss GPTQ's compensation cannot remove;
    ``output`` by the rounding's whole output error, which that compensation then changes.
    ``average`` (beyond SliM-LLM): a fractional width under ``bits``, reached by lowering the least
    salient full groups to ``bits - 1`` before SBA pairs the rest (each layer lands at or under it:
    its groups are whole).
    """

    method: ClassVar[str] = "slim"

    bits: int = option(2, "average bits per weight (groups use bits-1..bits+1)")
    groupsize: int = option(128, "columns per group (each group has one width)")
    sba: bool = option(True, "salience-determined bit allocation (off: every group at bits, plain GPTQ)")
    sqc: bool = option(True, "salience-weighted clipping of each group row's range (off: min-max)")
    tau: float = option(1.0, "extra weight of locally salient weights in the SQC error")
    clip_steps: int = option(20, "SQC tries clip_steps + 1 ranges")
    max_shrink: float = option(0.5, "SQC shrinks the range by at most this fraction")
    sba_error: SBAError = option(SBAError.DIAG, "what SBA minimises: diag (GPTQ's per-column loss) or output "
                                                "(tr(D H D^T), ignoring the compensation that follows)")
    average: float = option(0.0, "beyond SliM-LLM: a layer width below bits, in (bits-1, bits): the least salient "
                                 "full groups drop to bits-1 until the layer's width is at most this (0: exactly bits)",
                            record_default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(2 <= self.bits <= 7, f"slim needs an average of 2..7 bits (groups use bits-1..bits+1), got {self.bits}")
        check(self.groupsize >= 1, f"slim allocates bits per group: groupsize must be >= 1, got {self.groupsize}")
        check(self.tau >= 0, f"tau must be >= 0, got {self.tau}")
        check(self.clip_steps >= 0, f"clip_steps must be >= 0, got {self.clip_steps}")
        check(0 <= self.max_shrink < 1, f"max_shrink must be in [0, 1), got {self.max_shrink}")
        check(self.average == 0 or self.bits - 1 < self.average < self.bits,
              f"average must be 0 (exactly bits) or in ({self.bits - 1}, {self.bits}), got {self.average}")
        check(self.sba or not self.average, "average lowers the least salient groups: it needs sba (drop nosba)")



# ----------------------------------------------------------------------------- stored format: mixed (SliM-LLM)

def _column_lists(group_bits: list[int], cols: int, groupsize: int) -> dict[int, list[int]]:
    """For each width in ``group_bits``: the columns of the groups at that width, in order."""
    out: dict[int, list[int]] = {}
    for g, b in enumerate(group_bits):
        out.setdefault(b, []).extend(range(g * groupsize, min((g + 1) * groupsize, cols)))
    return dict(sorted(out.items()))


def mixed_columns(group_bits: list[int], cols: int, groupsize: int, device=None) -> dict[int, Tensor]:
    """For each width in ``group_bits``: (n,) the columns of the groups at that width, in order, on ``device``."""
    return {b: torch.tensor(c, dtype=torch.long, device=device)
            for b, c in _column_lists(group_bits, cols, groupsize).items()}


def _mixed_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    gb, gs = meta["group_bits"], meta["groupsize"]
    if len(gb) != grid_groups(c, gs) or not all(isinstance(b, int) and 1 <= b <= 8 for b in gb):
        raise ValueError(f"group_bits must list {grid_groups(c, gs)} widths in 1..8, got {gb!r}")
    f = {"scales": FieldSpec((r, len(gb)), scale_dtype(meta), "scales"),
         "zeros": FieldSpec((max(gb), r, packed_len(len(gb))), torch.uint8, "zero points")}
    for b, cols in _column_lists(gb, c, gs).items():
        f[f"codes{b}"] = FieldSpec((b, r, packed_len(len(cols))), torch.uint8, f"{b}-bit codes")
    return f


def _mixed_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r, c = shape
    gb, gs = meta["group_bits"], meta["groupsize"]
    dev = t["scales"].device
    codes = torch.zeros(r, c, dtype=torch.uint8, device=dev)
    for b, cols in mixed_columns(gb, c, gs, dev).items():
        codes[:, cols] = unpack_codes(t[f"codes{b}"], len(cols))
    zeros = unpack_codes(t["zeros"], len(gb))  # (r, G)
    if bool((zeros >= 2 ** torch.tensor(gb, device=dev)).any()):
        raise ValueError("a zero point lies outside its group's grid")
    idx = grid_index(c, gs, dev)
    return grid_values(codes, per_column(t["scales"].float(), idx), per_column(zeros, idx))


def mixed_pack(codes: Tensor, scales: Tensor, zeros: Tensor, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed mixed-precision fields: each group's (r, n) codes at its own width, the zeros at the widest."""
    gb, gs = meta["group_bits"], meta["groupsize"]
    codes, zeros = codes.round().to(torch.int32), zeros.round().to(torch.int32)
    out = {"scales": scales.to(scale_dtype(meta)), "zeros": pack_codes(zeros, max(gb))}
    for b, cols in mixed_columns(gb, codes.shape[1], gs, codes.device).items():
        out[f"codes{b}"] = pack_codes(codes[:, cols].contiguous(), b)
    return out


def _mixed_weight_bits(shape: Shape, meta: Meta) -> float:
    gs, cols = meta["groupsize"], shape[1]
    return sum(min(gs, cols - g * gs) * b for g, b in enumerate(meta["group_bits"])) / cols


def _mixed_layout(t: Tensors, shape: Shape, meta: Meta) -> Layout:
    gb, gs = meta["group_bits"], meta["groupsize"]
    zeros = unpack_codes(t["zeros"], len(gb)).float()  # (r, G)
    scale = t["scales"].float()
    out = []
    # a width's columns are its groups in order; only the layer's last group, last in its list, may be short
    for b, cols in mixed_columns(gb, shape[1], gs, scale.device).items():
        groups = torch.tensor([g for g, w in enumerate(gb) if w == b], dtype=torch.long, device=scale.device)
        s, z = scale[:, groups], zeros[:, groups]
        out.append(grid_planes(unpack_codes(t[f"codes{b}"], len(cols)), b, s, -s * z, gs, cols,
                               stored_planes=t[f"codes{b}"], values=GridValues(s, z)))
    return out


MIXED_FORMAT = register_format(Format("mixed", _mixed_fields, _mixed_decode, _mixed_weight_bits, _mixed_layout,
                                      map_bytes=lambda meta: len(meta["group_bits"])))



# ----------------------------------------------------------------------------- quantizer


LOCAL_SIGMAS = 3.0  # a weight is locally salient above mean + 3 std of its group row's salience


# ----------------------------------------------------------------------------- SBA

def group_sizes(cols: int, groupsize: int) -> list[int]:
    """Columns in each group of ``groupsize`` consecutive columns (the last may be shorter)."""
    return [min(groupsize, cols - st) for st in range(0, cols, groupsize)]


def group_salience(W: Tensor, d: Tensor, groupsize: int) -> Tensor:
    """(G,) summed salience ``w^2 / d_j^2`` of each group of columns; ``W`` (rows, cols), ``d`` (cols,)."""
    per_col = (W**2).sum(0) / d**2  # (cols,)
    G = len(group_sizes(W.shape[1], groupsize))
    return torch.zeros(G, dtype=per_col.dtype, device=W.device).index_add_(0, grid_index(W.shape[1], groupsize, W.device), per_col)


def lowered_groups(sizes: list[int], groupsize: int, bits: int, average: float) -> int:
    """How many full groups must drop to ``bits - 1`` for the layer's width to be at most ``average``
    (0 when ``average`` is 0; all the full groups when even that is not enough)."""
    if not average:
        return 0
    cols, full = sum(sizes), sum(n == groupsize for n in sizes)
    need = (bits - average) * cols / groupsize  # groups' worth of bits to remove
    return min(full, max(0, math.ceil(round(need, 9))))  # rounded first: 3.0000000001 is 3 groups, not 4


def allocation_candidates(salience: Tensor, sizes: list[int], groupsize: int, bits: int,
                          lowered: int = 0) -> list[list[int]]:
    """Allocations for ``k = 0, 1, ...``: the k most salient full groups at ``bits + 1``, the k least at ``bits - 1``.

    Only full groups move, so every candidate's average over weights is exactly ``bits``. The list
    stops when the next pair would take a bit from a group as salient as the one receiving it.
    ``lowered`` (beyond SliM-LLM): the ``lowered`` least salient full groups are at ``bits - 1`` in every
    candidate, and the pairs move among the others (every candidate's width is then
    ``bits - lowered * groupsize / cols``).
    """
    full = [g for g, n in enumerate(sizes) if n == groupsize]
    order = sorted(full, key=lambda g: (-float(salience[g]), g))  # most salient first; ties by position
    base, keep = [bits] * len(sizes), len(order) - lowered
    for g in order[keep:]:
        base[g] = bits - 1
    order = order[:keep]
    cands = [base]
    for k in range(1, len(order) // 2 + 1):
        up, down = order[k - 1], order[-k]
        if not float(salience[up]) > float(salience[down]):
            break
        nxt = list(cands[-1])
        nxt[up], nxt[down] = bits + 1, bits - 1
        cands.append(nxt)
    return cands


def allocation_errors(W: Tensor, H: Tensor, cands: list[list[int]], groupsize: int,
                      round_group: Callable[[Tensor, int, int], Tensor]) -> list[float]:
    """Output error ``tr(D H D^T)`` of each candidate, ``D = W - Q``, Q rounded group by group.

    Consecutive candidates differ in two groups, so each step updates ``D H`` on those columns only
    (``rows * 2 * groupsize * cols`` flops instead of ``rows * cols^2``).

    Args:
        W: (rows, cols); H: (cols, cols).
        round_group: ``(w (rows, n), bits, first column) -> q (rows, n)``.
    """
    cols = W.shape[1]
    spans = [(st, min(st + groupsize, cols)) for st in range(0, cols, groupsize)]
    cache: dict[tuple[int, int], Tensor] = {}

    def dq(g: int, b: int) -> Tensor:  # (rows, n) the group's error at width b
        if (g, b) not in cache:
            st, ed = spans[g]
            cache[(g, b)] = W[:, st:ed] - round_group(W[:, st:ed], b, st)
        return cache[(g, b)]

    D = torch.cat([dq(g, b) for g, b in enumerate(cands[0])], dim=1)  # (rows, cols)
    DH = D @ H  # (rows, cols)
    err = float(torch.sum(D * DH))
    errors = [err]
    for prev, cur in zip(cands, cands[1:]):
        moved = [g for g in range(len(cur)) if cur[g] != prev[g]]
        idx = torch.cat([torch.arange(*spans[g], device=W.device) for g in moved])  # (m,)
        delta = torch.cat([dq(g, cur[g]) for g in moved], dim=1) - D[:, idx]  # (rows, m)
        # tr((D + E) H (D + E)^T) = tr(D H D^T) + 2 tr(E (D H)^T) + tr(E H E^T), E zero outside idx
        err += float(2 * torch.sum(delta * DH[:, idx]) + torch.sum((delta @ H[idx][:, idx]) * delta))
        DH += delta @ H[idx]
        D[:, idx] += delta
        errors.append(err)
    return errors


def diag_allocation_errors(W: Tensor, d: Tensor, cands: list[list[int]], groupsize: int,
                           round_group: Callable[[Tensor, int, int], Tensor]) -> list[float]:
    """GPTQ's per-column loss ``sum (w - q)^2 / d_j^2`` of each candidate (additive over groups)."""
    cache: dict[tuple[int, int], float] = {}
    cols = W.shape[1]
    for cand in cands:
        for g, b in enumerate(cand):
            if (g, b) not in cache:
                st, ed = g * groupsize, min((g + 1) * groupsize, cols)
                w = W[:, st:ed]
                cache[(g, b)] = float((((w - round_group(w, b, st)) / d[st:ed].unsqueeze(0)) ** 2).sum())
    return [sum(cache[(g, b)] for g, b in enumerate(cand)) for cand in cands]


@dataclass
class Allocation:
    """The chosen widths of a layer's groups and how they were found.

    Attributes:
        group_bits: width of each group of columns.
        moved: k, the number of groups raised (and lowered).
        errors: output error of the rounded weights for k = 0, 1, ... (the candidates tried).
    """

    group_bits: list[int]
    moved: int
    errors: list[float]


def salience_allocation(W: Tensor, H: Tensor, d: Tensor, cfg: SliMConfig, calibrate: Calibrate) -> Allocation:
    """SBA for one layer: rank groups by salience, choose k by the output error of the rounded weights."""
    sizes = group_sizes(W.shape[1], cfg.groupsize)
    lowered = lowered_groups(sizes, cfg.groupsize, cfg.bits, cfg.average)
    cands = allocation_candidates(group_salience(W, d, cfg.groupsize), sizes, cfg.groupsize, cfg.bits, lowered)

    def round_group(w: Tensor, b: int, col: int) -> Tensor:
        scale, zero = calibrate(w, b, col)
        return quantize_minmax(w, scale, zero, b)

    if cfg.sba_error == "diag":
        errors = diag_allocation_errors(W, d, cands, cfg.groupsize, round_group)
    else:
        errors = allocation_errors(W, H, cands, cfg.groupsize, round_group)
    k = min(range(len(errors)), key=lambda i: (errors[i], i))
    return Allocation(group_bits=cands[k], moved=k, errors=errors)


# ----------------------------------------------------------------------------- SQC

def local_weights(delta: Tensor, tau: float, sigmas: float = LOCAL_SIGMAS) -> Tensor:
    """``omega`` (rows, n): ``1 + tau`` where ``delta`` exceeds its row's mean + ``sigmas`` std, else 1."""
    mu = delta.mean(dim=1, keepdim=True)
    sd = delta.std(dim=1, keepdim=True, unbiased=False)
    return 1.0 + tau * (delta > mu + sigmas * sd).to(delta.dtype)


def weighted_error(w: Tensor, q: Tensor, omega: Tensor) -> Tensor:
    """(rows, 1) ``sum_j omega_ij (w_ij - q_ij)^2``."""
    return torch.sum(omega * (w - q) ** 2, dim=1, keepdim=True)


def sqc_params(w: Tensor, omega: Tensor, bits: int, scale_dtype: Optional[torch.dtype], steps: int,
               max_shrink: float) -> tuple[Tensor, Tensor]:
    """Per-row (scale, zero) (rows, 1) minimising :func:`weighted_error` over shrunk min-max ranges.

    Candidates shrink both ends of the row's range by ``max_shrink * i / steps``, i = 0..steps;
    i = 0 is plain min-max, and a later candidate replaces it only if strictly better.
    """
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values  # (rows, 1)
    best_s, best_z = range_params(lo, hi, bits, scale_dtype)
    best = weighted_error(w, quantize_minmax(w, best_s, best_z, bits), omega)
    for i in range(1, steps + 1):
        shrink = 1.0 - max_shrink * i / steps
        s, z = range_params(lo * shrink, hi * shrink, bits, scale_dtype)
        e = weighted_error(w, quantize_minmax(w, s, z, bits), omega)
        better = e < best
        best = torch.where(better, e, best)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def make_calibrate(d: Tensor, cfg: SliMConfig, scale_dtype: Optional[torch.dtype]) -> Calibrate:
    """The group quantizer's calibration: SQC with salience ``w^2 / d_j^2`` of the group's columns, or min-max."""
    if not cfg.sqc:
        return lambda w, b, col: minmax_params(w, b, scale_dtype)

    def calibrate(w: Tensor, b: int, col: int) -> tuple[Tensor, Tensor]:
        delta = w**2 / d[col:col + w.shape[1]].unsqueeze(0) ** 2  # (rows, n)
        return sqc_params(w, local_weights(delta, cfg.tau), b, scale_dtype, cfg.clip_steps, cfg.max_shrink)

    return calibrate


# ----------------------------------------------------------------------------- the method

def stored_mixed(codes: Tensor, scales: Tensor, zeros: Tensor, group_bits: list[int], groupsize: int,
                 scale_dtype: str) -> StoredWeight:
    """The packed stored form of mixed-precision grid codes (each group at its own width)."""
    meta = {"group_bits": list(group_bits), "groupsize": groupsize, "scale_dtype": scale_dtype}
    tensors = mixed_pack(codes, scales, zeros, meta)
    return StoredWeight("mixed", tuple(codes.shape), meta, tensors)


@register_method(SliMConfig)
def slim_quantize_weight(W: Tensor, H: Tensor, cfg: SliMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """SliM-LLM at an average of ``cfg.bits``: SBA widths per group, SQC ranges, GPTQ compensation."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    H32 = H.to(torch.float32)
    sizes = group_sizes(W.shape[1], cfg.groupsize)
    found: dict[str, Allocation] = {}

    def factory(W0: Tensor, U: Tensor) -> GridColumns:
        calibrate = make_calibrate(torch.diag(U), cfg, sd)
        if cfg.sba:
            found["a"] = salience_allocation(W0, H32, torch.diag(U), cfg, calibrate)
        else:
            found["a"] = Allocation([cfg.bits] * len(sizes), 0, [])
        return GridColumns(W0, cfg.bits, cfg.groupsize, sd, group_bits=found["a"].group_bits, calibrate=calibrate)

    run = gptq_weight(W, H, cfg.blocksize, cfg.percdamp, factory, act_order=False, times=times)
    grid: GridColumns = run.quantizer  # type: ignore[assignment]
    alloc = found["a"]
    stored = stored_mixed(grid.codes, torch.cat(grid.scales, 1), torch.cat(grid.zeros, 1), alloc.group_bits,
                          cfg.groupsize, cfg.scale_dtype)
    info = {"percdamp_used": run.percdamp, "group_bits": alloc.group_bits, "sba_moved": alloc.moved,
            "sba_error_ratio": alloc.errors[alloc.moved] / alloc.errors[0] if alloc.errors and alloc.errors[0] > 0 else None}
    return WeightResult(q=run.q, info=info, stored=stored)
