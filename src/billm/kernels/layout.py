"""Column-aligned bit planes: the layout the fast paths read, built once per layer from its stored form.

The checkpoint keeps some fields compressed (BiLLM's group bitmap covers only the non-salient
entries, its second sign plane only the salient columns; SliM-LLM's codes are split by width).
A kernel wants every plane aligned to the input columns, so that byte ``k`` of a row covers
columns ``8k .. 8k+7`` in every plane. Rows are padded with zero bits to whole blocks (BiLLM) or
groups (grid formats), so each block or group starts on a byte.

Two layouts cover every format but PB-LLM:

* :class:`BiLLMPlanes`: ``s1``, ``grp`` (1 = sparse group, 0 on salient columns), ``s2`` (0 off
  the salient columns), each (r, nbytes) uint8, a column mask ``sal`` (nbytes,), and per row and
  block the four scales (and means); see :func:`billm.packing.formats.billm_values`.
* :class:`GridPlanes`: integer codes as bit planes with ``w = scale * code + offset`` per row and
  group of columns: RTN/GPTQ (``offset = -scale * zero``), plain sign (code = sign bit,
  ``scale = 2 alpha``, ``offset = mean - alpha``), and each width of a SliM-LLM layer over its own
  columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from ..packing.bitpack import pack_bits, unpack_bits, unpack_codes
from ..packing.formats import StoredWeight, billm_unpack, mixed_columns


def _pad_bytes(p: Tensor, nbytes: int) -> Tensor:
    """Pad the last dim of a packed plane with zero bytes to ``nbytes``."""
    return torch.nn.functional.pad(p, (0, nbytes - p.shape[-1])).contiguous()


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
class GridPlanes:
    """``w_ij = scale[i, g(j)] * code_ij + offset[i, g(j)]`` over the columns ``cols`` of the input.

    Attributes:
        planes: (bits, r, nbytes) uint8 code bit planes over ``cols``, each group padded to
            ``ceil(groupsize / 8)`` bytes.
        scale, offset: (r, G) float32.
        groupsize: columns per group (the last may be shorter).
        cols: (n,) long, the input columns these planes cover (None: all, in order).
        n: number of covered columns.
    """

    planes: Tensor
    scale: Tensor
    offset: Tensor
    groupsize: int
    cols: Optional[Tensor]
    n: int

    @property
    def rows(self) -> int:
        return self.planes.shape[1]

    @property
    def group_bytes(self) -> int:
        return (self.groupsize + 7) // 8


Layout = Union[BiLLMPlanes, list[GridPlanes]]


def _aligned(n: int, groupsize: int) -> bool:
    """Whether the stored packing (rows padded only at the end) already starts every group on a byte."""
    return groupsize % 8 == 0 and n % groupsize == 0


def _grouped_planes(codes: Tensor, bits: int, groupsize: int) -> Tensor:
    """(r, n) integer codes -> (bits, r, G * ceil(gs/8)) planes, each group starting on a byte."""
    r, n = codes.shape
    gb = (groupsize + 7) // 8
    G = -(-n // groupsize)
    padded = torch.zeros(r, G * gb * 8, dtype=torch.int32, device=codes.device)
    idx = torch.arange(n, device=codes.device)
    padded[:, (idx // groupsize) * gb * 8 + idx % groupsize] = codes.to(torch.int32)
    return torch.stack([pack_bits(((padded >> i) & 1).bool()) for i in range(bits)])


def grid_planes(codes: Tensor, bits: int, scale: Tensor, offset: Tensor, groupsize: int,
                cols: Optional[Tensor] = None, stored_planes: Optional[Tensor] = None) -> GridPlanes:
    """A :class:`GridPlanes` from (r, n) codes and (r, G) scale/offset.

    ``stored_planes``: the stored bit planes of the same codes, shared instead of copied when their
    groups already start on bytes.
    """
    n = codes.shape[1]
    planes = stored_planes if stored_planes is not None and _aligned(n, groupsize) else _grouped_planes(codes, bits, groupsize)
    return GridPlanes(planes, scale.float().contiguous(), offset.float().contiguous(), groupsize, cols, n)


def build_layout(st: StoredWeight) -> Optional[Layout]:
    """The fast-path layout of a stored weight, or None where only decode-then-matmul applies.

    None for PB-LLM (an unstructured salient bitmap) and for GPTQ with act-order groups.
    """
    r, c = st.shape
    m, t = st.meta, st.tensors
    if st.format == "billm":
        bs = m["blocksize"]
        s1, sal, sparse, s2 = billm_unpack(t, st.shape, m)
        if s2 is None:
            s2 = torch.zeros_like(s1)

        def plane(x: Tensor) -> Tensor:  # (r, c) bool -> (r, nbytes), each block on a byte boundary
            return _grouped_planes(x.to(torch.int32), 1, bs)[0]

        # scales in fp16 (fp8 and fp16 values are exact in it), fp32 only when stored so
        sdt = torch.float32 if t["scales"].dtype == torch.float32 else torch.float16

        def per_row(x: Tensor) -> Tensor:  # (nb, slots, r) -> (r, nb, 4); order 1 has no second salient slot
            x = x.to(sdt).permute(2, 0, 1)
            return torch.nn.functional.pad(x, (0, 4 - x.shape[2])).contiguous()

        salp = plane(sal.unsqueeze(0))[0]
        scales = per_row(t["scales"])
        means = per_row(t["means"]) if m["centred"] else None
        s1p = t["signs"] if _aligned(c, bs) else plane(s1)  # the stored plane itself when already aligned
        return BiLLMPlanes(s1p, plane(sparse & ~sal.unsqueeze(0)), plane(s2 & sal.unsqueeze(0)), salp,
                           scales, means, bs, c)
    if st.format == "grid":
        if m.get("g_idx"):
            return None
        gs = c if m["groupsize"] == -1 else m["groupsize"]
        G = -(-c // gs)
        codes = unpack_codes(t["codes"], c)
        zeros = unpack_codes(t["zeros"], G).float()
        scale = t["scales"].float()
        return [grid_planes(codes, m["bits"], scale, -scale * zeros, gs, stored_planes=t["codes"])]
    if st.format == "mixed":
        gb, gs = m["group_bits"], m["groupsize"]
        zeros = unpack_codes(t["zeros"], len(gb)).float()  # (r, G)
        scale = t["scales"].float()
        out = []
        # a width's columns are its groups in order; only the layer's last group, last in its list, may be short
        for b, cols in mixed_columns(gb, c, gs).items():
            groups = torch.tensor([g for g, w in enumerate(gb) if w == b], dtype=torch.long, device=scale.device)
            s, z = scale[:, groups], zeros[:, groups]
            out.append(grid_planes(unpack_codes(t[f"codes{b}"], len(cols)), b, s, -s * z, gs, cols.to(scale.device),
                                   stored_planes=t[f"codes{b}"]))
        return out
    if st.format == "sign":
        s = unpack_bits(t["signs"], c).to(torch.int32)
        alpha = t["scales"].float().t()  # (r, 1)
        mean = t["means"].float().t() if m["centred"] else torch.zeros_like(alpha)
        return [grid_planes(s, 1, 2 * alpha, mean - alpha, c, stored_planes=t["signs"].unsqueeze(0))]
    return None
