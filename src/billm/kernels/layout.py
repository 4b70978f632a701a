"""Column-aligned bit planes: the layout the fast paths read.

Each stored format builds its layout from its own fields (``layout`` of a
:class:`billm.packing.formats.Format`) with the generic helpers here; this module knows no format.

The checkpoint keeps some fields compressed (BiLLM's group bitmap covers only the non-salient
entries, its second sign plane only the salient columns; SliM-LLM's codes are split by width).
A kernel wants every plane aligned to the input columns, so that byte ``k`` of a row covers
columns ``8k .. 8k+7`` in every plane. Rows are padded with zero bits to whole blocks (BiLLM) or
groups (grid formats), so each block or group starts on a byte.

Three layouts cover every built-in format but PB-LLM:

* :class:`BiLLMPlanes`: ``s1``, ``grp`` (1 = sparse group, 0 on salient columns), ``s2`` (0 off
  the salient columns), each (r, nbytes) uint8, a column mask ``sal`` (nbytes,), and per row and
  block the four scales (and means); see :func:`billm.methods.billm.billm_values`.
* :class:`GridPlanes`: integer codes as bit planes with ``w = scale * code + offset`` per row and
  group of columns: RTN/GPTQ (``offset = -scale * zero``), plain sign (code = sign bit,
  ``scale = 2 alpha``, ``offset = mean - alpha``), and each width of a SliM-LLM layer over its own
  columns.
* :class:`Factors`: a product of two grid layouts with a scale per output row and input column
  (low-rank binary factors); every path multiplies by the two factors in turn.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from .bitpack import pack_bits


@dataclass
class BiLLMPlanes:
    """BiLLM in column-aligned planes.

    Attributes:
        s1, grp, s2: (r, nbytes) uint8, ``nbytes = n_blocks * blocksize / 8`` (zero padded).
        sal: (nbytes,) uint8 salient-column mask.
        scales: (r, n_blocks, 4) float16 (float32 when stored so), slots (concentrated, sparse,
            salient 1, salient 2).
        means: same shape or None.
        blocksize, cols: as stored.
    """

    s1: Tensor
    grp: Tensor
    s2: Tensor
    sal: Tensor
    scales: Tensor
    means: Optional[Tensor]
    blocksize: int
    cols: int

    @property
    def rows(self) -> int:
        return self.s1.shape[0]


@dataclass
class GridValues:
    """A grid format's weights exactly as its decoder computes them, in float32:
    ``mult * (v - zero) + shift`` per row and group, ``v`` the code, or ``2 code - 1`` (a sign) when
    ``signed``; ``zero`` and ``shift`` are skipped when None. (``scale * code + offset`` of
    :class:`GridPlanes` is the same weight, but rounded differently: the kernels' form.)

    Attributes:
        mult: (r, G) float32.
        zero, shift: (r, G) float32 or None.
        signed: 1-bit codes stand for -1 / +1.
    """

    mult: Tensor
    zero: Optional[Tensor] = None
    shift: Optional[Tensor] = None
    signed: bool = False


@dataclass
class GridPlanes:
    """``w_ij = scale[i, g(j)] * code_ij + offset[i, g(j)]`` over the columns ``cols`` of the input.

    Attributes:
        planes: (bits, r, nbytes) uint8 code bit planes over ``cols``, each group padded to
            ``ceil(groupsize / 8)`` bytes.
        scale, offset: (r, G) float32.
        groupsize: columns per group (the last may be shorter).
        cols: (n,) long, the input columns these planes cover (None: all, in order).
        n: number of covered columns.
        values: the format's exact decode (:class:`GridValues`), for the byte-table decoder
            (:mod:`.decode`); None: the weight is decoded by the format alone.
    """

    planes: Tensor
    scale: Tensor
    offset: Tensor
    groupsize: int
    cols: Optional[Tensor]
    n: int
    values: Optional[GridValues] = None

    @property
    def rows(self) -> int:
        return self.planes.shape[1]

    @property
    def group_bytes(self) -> int:
        return (self.groupsize + 7) // 8


@dataclass
class Factors:
    """A weight held as a product of two narrow ones: ``W = s_out * (U V) * s_in`` (per output row and input
    column), ``V`` (r, in) and ``U`` (out, r) each a grid layout (low-rank binary factors: 1-bit signs). Its
    product ``x W^T = s_out * (((x * s_in) V^T) U^T)`` is two of the kernels' products of rank ``r``; its weight is
    only decoded where something asks for it whole (:func:`billm.kernels.decode.decode_weight`).

    Attributes:
        first: V's planes (r rows over the ``in`` columns).
        second: U's planes (``out`` rows over r columns).
        s_in: (in,) float32; s_out: (out,) float32.
    """

    first: list[GridPlanes]
    second: list[GridPlanes]
    s_in: Tensor
    s_out: Tensor

    @property
    def rows(self) -> int:
        return self.second[0].rows


Layout = Union[BiLLMPlanes, list[GridPlanes], Factors]


def factored(x: Tensor, layout: Factors, matmul: Callable[[Tensor, Any], Tensor]) -> Tensor:
    """``x`` (T, in) times a :class:`Factors` layout's weight transposed, by ``matmul(x, grid layout)`` twice:
    ``s_out * matmul(matmul(x * s_in, V), U)``, in the dtype ``matmul`` returns."""
    h = matmul(x * layout.s_in.to(x.dtype), layout.first)  # (T, r)
    return matmul(h, layout.second) * layout.s_out.to(h.dtype)  # (T, out)


def aligned(n: int, groupsize: int) -> bool:
    """Whether the stored packing (rows padded only at the end) already starts every group on a byte."""
    return groupsize % 8 == 0 and n % groupsize == 0


def grouped_planes(codes: Tensor, bits: int, groupsize: int) -> Tensor:
    """(r, n) integer codes -> (bits, r, G * ceil(gs/8)) planes, each group starting on a byte."""
    r, n = codes.shape
    gb = (groupsize + 7) // 8
    G = -(-n // groupsize)
    padded = torch.zeros(r, G * gb * 8, dtype=torch.int32, device=codes.device)
    idx = torch.arange(n, device=codes.device)
    padded[:, (idx // groupsize) * gb * 8 + idx % groupsize] = codes.to(torch.int32)
    return torch.stack([pack_bits(((padded >> i) & 1).bool()) for i in range(bits)])


def grid_planes(codes: Tensor, bits: int, scale: Tensor, offset: Tensor, groupsize: int,
                cols: Optional[Tensor] = None, stored_planes: Optional[Tensor] = None,
                values: Optional[GridValues] = None) -> GridPlanes:
    """A :class:`GridPlanes` from (r, n) codes and (r, G) scale/offset.

    ``stored_planes``: the stored bit planes of the same codes, shared instead of copied when their
    groups already start on bytes. ``values``: the format's exact decode (see :class:`GridPlanes`).
    """
    n = codes.shape[1]
    planes = stored_planes if stored_planes is not None and aligned(n, groupsize) else grouped_planes(codes, bits, groupsize)
    if values is not None:
        values = GridValues(*(t.float().contiguous() if t is not None else None
                              for t in (values.mult, values.zero, values.shift)), values.signed)
    return GridPlanes(planes, scale.float().contiguous(), offset.float().contiguous(), groupsize, cols, n, values)


def flatten(layout: Layout) -> tuple[dict, list[Tensor]]:
    """A layout as (a JSON-able description, its tensors in order): what a custom op can take
    (:func:`billm.packing.linear.packed_linear`). :func:`unflatten` is the inverse."""
    if isinstance(layout, Factors):
        (first, t1), (second, t2) = flatten(layout.first), flatten(layout.second)
        return {"kind": "factors", "first": first, "second": second, "n_first": len(t1), "n_second": len(t2)}, \
            [*t1, *t2, layout.s_in, layout.s_out]
    if isinstance(layout, BiLLMPlanes):
        tensors = [layout.s1, layout.grp, layout.s2, layout.sal, layout.scales]
        if layout.means is not None:
            tensors.append(layout.means)
        return {"kind": "billm", "blocksize": layout.blocksize, "cols": layout.cols,
                "means": layout.means is not None}, tensors
    parts, tensors = [], []
    for p in layout:
        v = p.values
        parts.append({"groupsize": p.groupsize, "n": p.n, "cols": p.cols is not None,
                      "values": None if v is None else {"zero": v.zero is not None, "shift": v.shift is not None,
                                                        "signed": v.signed}})
        tensors += [p.planes, p.scale, p.offset] + ([p.cols] if p.cols is not None else [])
        if v is not None:
            tensors += [v.mult] + [t for t in (v.zero, v.shift) if t is not None]
    return {"kind": "grid", "parts": parts}, tensors


def unflatten(spec: dict, tensors: list[Tensor]) -> Layout:
    """The layout :func:`flatten` described (sharing its tensors).

    Raises:
        ValueError: the description and the tensors do not match.
    """
    if spec.get("kind") == "factors":
        a, b = spec["n_first"], spec["n_first"] + spec["n_second"]
        if len(tensors) != b + 2:
            raise ValueError(f"a factors layout takes {b + 2} tensors, got {len(tensors)}")
        first, second = unflatten(spec["first"], tensors[:a]), unflatten(spec["second"], tensors[a:b])
        assert isinstance(first, list) and isinstance(second, list)
        return Factors(first, second, tensors[b], tensors[b + 1])
    it = iter(tensors)

    def take() -> Tensor:
        t = next(it, None)
        if t is None:
            raise ValueError(f"a {spec.get('kind')} layout needs more than {len(tensors)} tensors")
        return t

    if spec.get("kind") == "billm":
        s1, grp, s2, sal, scales = (take() for _ in range(5))
        out: Layout = BiLLMPlanes(s1, grp, s2, sal, scales, take() if spec["means"] else None, spec["blocksize"],
                                  spec["cols"])
    elif spec.get("kind") == "grid":
        out = []
        for part in spec["parts"]:
            planes, scale, offset = take(), take(), take()
            cols = take() if part["cols"] else None
            values = None
            if part["values"] is not None:
                v = part["values"]
                values = GridValues(take(), take() if v["zero"] else None, take() if v["shift"] else None, v["signed"])
            out.append(GridPlanes(planes, scale, offset, part["groupsize"], cols, part["n"], values))
    else:
        raise ValueError(f"unknown layout kind {spec.get('kind')!r}")
    if next(it, None) is not None:
        raise ValueError(f"a {spec['kind']} layout takes fewer than {len(tensors)} tensors")
    return out
