"""Stored forms of quantized weights: which packed tensors each method keeps, and how they decode.

A :class:`StoredWeight` is what a checkpoint holds for one quantized linear: a format name, the
weight's shape, a few scalar attributes (``meta``) and packed tensors. Each format declares its
fields (shape, dtype and what the bytes are spent on) so a file can be validated before use,
and a ``values`` function that turns the packed tensors back into the (rows, cols) float32
weights. The methods build their simulated weights *through the same value functions*, so a
loaded checkpoint reproduces the in-memory quantized model bit for bit.

Formats (``r`` rows, ``c`` columns, ``nb`` OBC blocks of ``blocksize`` columns):

``billm``
    ``signs`` (r, c) first sign plane; ``signs2`` (r, k) second plane of the ``k`` salient
    columns (order 2); ``group`` (r, c-k) bitmap of the non-salient entries (1 = sparse group);
    ``salient_mask`` (c,) column flags; ``scales`` (nb, 2+order, r) per block and row, slots
    (concentrated, sparse, salient pass 1, salient pass 2); ``means`` likewise when centred.
``grid`` (RTN, GPTQ)
    ``codes`` integer codes as ``bits`` bit planes; ``scales`` (r, G) and ``zeros`` (r, G) as
    bit planes, G groups of ``groupsize`` columns; ``g_idx`` (c,) group of each column when
    GPTQ's act-order permuted them.
``mixed`` (SliM-LLM)
    ``group_bits`` (meta) the width of each group of ``groupsize`` columns; for each width ``b``
    present, ``codes{b}`` the codes of the columns of its groups as ``b`` bit planes; ``zeros``
    (r, G) the zero points as bit planes of the widest width (one tensor: less byte padding than
    one per width); ``scales`` (r, G).
``sign``
    ``signs`` (r, c); ``scales`` (1, r); ``means`` (1, r) when centred.
``pbllm``
    ``salient_mask`` (r, c) bitmap; ``codes`` the salient entries' codes (row-major) as bit
    planes; ``signs`` the other entries' signs (row-major); ``scales`` (nb, 2, r) binary scale and
    grid scale per block and row; ``zeros`` (r, nb) as bit planes.

Bit planes and bitmaps are packed 8 to a byte along the input dimension (:mod:`.bitpack`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES
from ..errors import QuantizationError
from ..kernels.bitpack import pack_bits, pack_codes, packed_len, unpack_bits, unpack_codes
from ..kernels.layout import BiLLMPlanes, GridValues, Layout, aligned, grid_planes, grouped_planes

Shape = tuple[int, int]
Meta = dict[str, Any]
Tensors = dict[str, Tensor]


@dataclass(frozen=True)
class FieldSpec:
    """One packed tensor of a format: its shape, dtype and what its bytes pay for (``kind``)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: str


@dataclass(frozen=True)
class Format:
    """A stored form: what a checkpoint keeps for one quantized linear, and everything derived from it.

    Attributes:
        name: the key in checkpoints' maps.
        fields: ``(shape, meta) -> {field: FieldSpec}``, the packed tensors a weight must have.
        decode: ``(tensors, shape, meta) -> (rows, cols) float32`` weights. Quantizers build their
            simulated weights through the same function, so a loaded layer equals the quantized one.
        weight_bits: ``(shape, meta) -> float``, code/sign bits per weight as papers count them
            (no scales, bitmaps or masks).
        layout: ``(tensors, shape, meta) -> Layout or None``, the column-aligned planes the fast
            paths read (:mod:`billm.kernels.layout`); None: every call decodes the whole weight.
        map_bytes: ``meta -> int``, bytes of side information the layer keeps in the JSON map
            rather than in tensors (counted in its storage bits).
    """

    name: str
    fields: Callable[[Shape, Meta], dict[str, FieldSpec]]
    decode: Callable[[Tensors, Shape, Meta], Tensor]
    weight_bits: Callable[[Shape, Meta], float]
    layout: Optional[Callable[[Tensors, Shape, Meta], Optional[Layout]]] = None
    map_bytes: Callable[[Meta], int] = lambda meta: 0


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make ``fmt`` known to the loader, ``inspect`` and :class:`~billm.packing.linear.PackedLinear`; returns it."""
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    """The registered format ``name``."""
    if name not in FORMATS:
        raise KeyError(f"unknown stored-weight format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


ROTATION_FIELD = "rotation_signs"
"""The packed field a layer with an input rotation keeps beside its format's (:mod:`.rotation`)."""


def layer_fields(fmt: str, shape: Shape, meta: Meta) -> dict[str, FieldSpec]:
    """The packed tensors a stored layer must have: its format's fields, plus the (cols,) sign vector of
    its input rotation, bit-packed, when ``meta['rotate']`` names one (generic over formats)."""
    f = dict(get_format(fmt).fields(shape, meta))
    if meta.get("rotate") is not None:
        b = meta.get("rotate_block")
        if meta["rotate"] != "hadamard" or not isinstance(b, int) or b < 1 or b & (b - 1) or shape[1] % b:
            raise ValueError(f"unknown rotation {meta['rotate']!r} with block {b!r} for {shape[1]} columns")
        f[ROTATION_FIELD] = FieldSpec((packed_len(shape[1]),), torch.uint8, "rotation signs")
    return f


def storage_bits(fmt: str, shape: Shape, meta: Meta, tensor_bytes: int) -> float:
    """Bits per weight of a stored layer: (bytes of its packed tensors + its share of the map) x 8 / weights.

    The one definition of storage bits: the quantize report (from the module's buffers),
    ``billm inspect`` (from the file's header) and ``billm compare`` all call it.
    """
    rows, cols = shape
    return (tensor_bytes + get_format(fmt).map_bytes(meta)) * 8 / (rows * cols)


@dataclass
class StoredWeight:
    """The stored form of one quantized linear.

    Attributes:
        format: a key of :data:`FORMATS`.
        shape: (out_features, in_features) of the weight.
        meta: JSON-able scalar attributes the format needs (blocksize, bits, ...).
        tensors: the packed tensors, by field name.
    """

    format: str
    shape: Shape
    meta: Meta
    tensors: Tensors = field(repr=False)

    def fields(self) -> dict[str, FieldSpec]:
        """The fields this weight must have (from shape and meta; with a rotation's signs: :func:`layer_fields`)."""
        return layer_fields(self.format, self.shape, self.meta)

    def values(self) -> Tensor:
        """The dequantized (rows, cols) float32 weight."""
        return get_format(self.format).decode(self.tensors, self.shape, self.meta)

    def layout(self) -> Optional[Layout]:
        """The fast paths' column-aligned planes, or None where only decode-then-matmul applies."""
        build = get_format(self.format).layout
        return build(self.tensors, self.shape, self.meta) if build is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of all packed tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def weight_bits(self) -> float:
        """Code/sign bits per weight as papers count them."""
        return get_format(self.format).weight_bits(self.shape, self.meta)

    @property
    def storage_bits(self) -> float:
        """Bits per weight of everything stored (:func:`storage_bits`)."""
        return storage_bits(self.format, self.shape, self.meta, self.nbytes)

    def to(self, device: Any) -> "StoredWeight":
        """A copy with the tensors on ``device``."""
        return StoredWeight(self.format, self.shape, dict(self.meta), {k: v.to(device) for k, v in self.tensors.items()})


# ----------------------------------------------------------------------------- shared helpers

def scale_dtype(meta: dict[str, Any]) -> torch.dtype:
    """The dtype scales and means are stored in (``meta['scale_dtype']``)."""
    return SCALE_DTYPES[meta.get("scale_dtype", "float16")]


def round_to_stored(x: Tensor, dtype: Optional[torch.dtype]) -> Tensor:
    """``x`` rounded to what ``dtype`` can hold, kept in x's dtype (None: unchanged).

    Quantizers round scales and means with this *before* using them, so the stored values are
    exactly the ones the error compensation saw.

    Raises:
        QuantizationError: a value overflows the stored dtype.
    """
    if dtype is None or dtype == x.dtype:
        return x
    y = x.to(dtype)
    big = torch.finfo(dtype).max
    if (not torch.isfinite(y.to(x.dtype)).all() or x.abs().max() > big) and torch.isfinite(x).all():
        raise QuantizationError(f"a scale or mean (max |x| = {float(x.abs().max()):.3g}) overflows {dtype}; "
                                "use scale_dtype='float32'")
    return y.to(x.dtype)


def smallest_positive(dtype: torch.dtype) -> float:
    """Smallest positive value of a float dtype (subnormals included): a floor for grid scales."""
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)


def pm1(bits: Tensor) -> Tensor:
    """Bool sign bits to float32 +1 / -1."""
    return torch.where(bits, 1.0, -1.0)


def _per_column(t: Tensor, col_group: Tensor) -> Tensor:
    """(rows, G) per-group values to (rows, cols) via the group index of each column (read-only: one group
    is a broadcast view, not a copy)."""
    if t.shape[1] == 1 and col_group.numel():  # one group (a block's own decode): every index is 0
        return t.expand(t.shape[0], col_group.numel())
    return t.index_select(1, col_group)  # the same as t[:, col_group], several times faster on the CPU


def _block_index(cols: int, blocksize: int, device) -> Tensor:
    return torch.arange(cols, device=device) // blocksize  # (cols,)


def _n_blocks(cols: int, blocksize: int) -> int:
    return math.ceil(cols / blocksize)


# ----------------------------------------------------------------------------- billm

BILLM_SLOTS = ("concentrated", "sparse", "salient1", "salient2")


def billm_values(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Optional[Tensor], scales: Tensor,
                 means: Optional[Tensor], blocksize: int) -> Tensor:
    """Decode BiLLM from unpacked bits.

    Args:
        s1: (r, c) bool first sign plane.
        salient: (c,) bool salient-column flags.
        sparse: (r, c) bool, True for the sparse group (ignored on salient columns).
        s2: (r, c) bool second plane (used on salient columns), or None for order 1.
        scales: (nb, 2 + order, r) float32, slots as :data:`BILLM_SLOTS`.
        means: same shape as ``scales`` or None (not centred).
        blocksize: columns per block.

    Returns:
        (r, c) float32: ``a1 * s1 + m1`` with the group's (a1, m1), plus ``a2 * s2 + m2`` on
        salient columns.
    """
    r, c = s1.shape
    blk = _block_index(c, blocksize, s1.device)
    sal = salient.unsqueeze(0)  # (1, c)

    def slot(t: Tensor, i: int) -> Tensor:
        return _per_column(t[:, i, :].t(), blk)  # (r, c)

    def first(t: Tensor) -> Tensor:
        return torch.where(sal, slot(t, 2), torch.where(sparse, slot(t, 1), slot(t, 0)))

    q = first(scales) * pm1(s1)
    if means is not None:
        q = q + first(means)
    if s2 is not None:
        q2 = torch.where(sal, slot(scales, 3), 0.0) * pm1(s2)
        if means is not None:
            q2 = q2 + torch.where(sal, slot(means, 3), 0.0)
        q = q + q2
    return q


def _column_split(meta: dict[str, Any]) -> bool:
    """Whether the group bitmap holds one bit per non-salient column (``split: column``), not one per weight."""
    return meta.get("split", "weight") == "column"


def _billm_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    k, order = meta["n_salient"], meta["salient_order"]
    nb = _n_blocks(c, meta["blocksize"])
    sd = scale_dtype(meta)
    group = (packed_len(c - k),) if _column_split(meta) else (r, packed_len(c - k))
    f = {"signs": FieldSpec((r, packed_len(c)), torch.uint8, "signs"),
         "group": FieldSpec(group, torch.uint8, "group bitmap"),
         "salient_mask": FieldSpec((packed_len(c),), torch.uint8, "salient-column mask"),
         "scales": FieldSpec((nb, 2 + order, r), sd, "scales")}
    if order == 2:
        f["signs2"] = FieldSpec((r, packed_len(k)), torch.uint8, "salient 2nd signs")
    if meta["centred"]:
        f["means"] = FieldSpec((nb, 2 + order, r), sd, "means")
    return f


def billm_unpack(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> tuple[Tensor, ...]:
    """(s1, salient, sparse, s2) as full bool tensors from the packed BiLLM fields."""
    r, c = shape
    k = meta["n_salient"]
    s1 = unpack_bits(t["signs"], c)
    sal = unpack_bits(t["salient_mask"], c)
    if int(sal.sum()) != k:
        raise ValueError(f"the salient-column mask has {int(sal.sum())} columns set, the map says {k}")
    sparse = torch.zeros(r, c, dtype=torch.bool, device=s1.device)
    sparse[:, ~sal] = unpack_bits(t["group"], c - k)  # (c - k,) per column, broadcast over rows, or (r, c - k)
    s2 = None
    if meta["salient_order"] == 2:
        s2 = torch.zeros(r, c, dtype=torch.bool, device=s1.device)
        s2[:, sal] = unpack_bits(t["signs2"], k)
    return s1, sal, sparse, s2


def _billm_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    s1, sal, sparse, s2 = billm_unpack(t, shape, meta)
    means = t["means"].float() if meta["centred"] else None
    return billm_values(s1, sal, sparse, s2, t["scales"].float(), means, meta["blocksize"])


def billm_pack(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Optional[Tensor], scales: Tensor,
               means: Optional[Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed BiLLM fields from full bool planes and (nb, slots, r) float32 scales/means."""
    sd = scale_dtype(meta)
    group = sparse[:, ~salient].contiguous()  # (r, c - k)
    if _column_split(meta):
        if not torch.equal(group, group[:1].expand_as(group)):
            raise ValueError("split 'column': the sparse group must hold whole columns")
        group = group[0]  # (c - k,)
    out = {"signs": pack_bits(s1), "group": pack_bits(group),
           "salient_mask": pack_bits(salient), "scales": scales.to(sd)}
    if s2 is not None:
        out["signs2"] = pack_bits(s2[:, salient].contiguous())
    if means is not None:
        out["means"] = means.to(sd)
    return out


def _billm_weight_bits(shape: Shape, meta: Meta) -> float:
    cols, k = shape[1], meta["n_salient"]
    return (meta["salient_order"] * k + (cols - k)) / cols


def _billm_layout(t: Tensors, shape: Shape, meta: Meta) -> BiLLMPlanes:
    bs = meta["blocksize"]
    s1, sal, sparse, s2 = billm_unpack(t, shape, meta)
    if s2 is None:
        s2 = torch.zeros_like(s1)

    def plane(x: Tensor) -> Tensor:  # (r, c) bool -> (r, nbytes), each block on a byte boundary
        return grouped_planes(x.to(torch.int32), 1, bs)[0]

    # scales in fp16 (fp8 and fp16 values are exact in it), fp32 only when stored so
    sdt = torch.float32 if t["scales"].dtype == torch.float32 else torch.float16

    def per_row(x: Tensor) -> Tensor:  # (nb, slots, r) -> (r, nb, 4); order 1 has no second salient slot
        x = x.to(sdt).permute(2, 0, 1)
        return torch.nn.functional.pad(x, (0, 4 - x.shape[2])).contiguous()

    s1p = t["signs"] if aligned(shape[1], bs) else plane(s1)  # the stored plane itself when already aligned
    return BiLLMPlanes(s1p, plane(sparse & ~sal.unsqueeze(0)), plane(s2 & sal.unsqueeze(0)), plane(sal.unsqueeze(0))[0],
                       per_row(t["scales"]), per_row(t["means"]) if meta["centred"] else None, bs, shape[1])


BILLM_FORMAT = register_format(Format("billm", _billm_fields, _billm_decode, _billm_weight_bits, _billm_layout))


# ----------------------------------------------------------------------------- grid (RTN / GPTQ)

def grid_values(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (code - zero)`` in float32; scale and zero broadcast against codes."""
    return scale * (codes.to(torch.float32) - zero.to(torch.float32))


def _grid_groups(c: int, gs: int) -> int:
    return 1 if gs == -1 else math.ceil(c / gs)


def grid_index(c: int, groupsize: int, device=None) -> Tensor:
    """(c,) group of each column when groups are consecutive columns."""
    if groupsize == -1:
        return torch.zeros(c, dtype=torch.long, device=device)
    return torch.arange(c, device=device) // groupsize


def _grid_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    bits, g = meta["bits"], _grid_groups(c, meta["groupsize"])
    f = {"codes": FieldSpec((bits, r, packed_len(c)), torch.uint8, "codes"),
         "scales": FieldSpec((r, g), scale_dtype(meta), "scales"),
         "zeros": FieldSpec((bits, r, packed_len(g)), torch.uint8, "zero points")}
    if meta.get("g_idx"):
        f["g_idx"] = FieldSpec((c,), torch.int32, "group index")
    return f


def _grid_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r, c = shape
    g = _grid_groups(c, meta["groupsize"])
    codes = unpack_codes(t["codes"], c)  # (r, c)
    zeros = unpack_codes(t["zeros"], g)  # (r, G)
    idx = t["g_idx"].long() if meta.get("g_idx") else grid_index(c, meta["groupsize"], codes.device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= g):
        raise ValueError(f"g_idx holds a group outside 0..{g - 1}")
    return grid_values(codes, _per_column(t["scales"].float(), idx), _per_column(zeros, idx))


def grid_pack(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Optional[Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed grid fields from (r, c) codes, (r, G) float scales and (r, G) integer zeros."""
    bits = meta["bits"]
    out = {"codes": pack_codes(codes, bits), "scales": scales.to(scale_dtype(meta)),
           "zeros": pack_codes(zeros.round().to(torch.int32), bits)}
    if meta.get("g_idx"):
        out["g_idx"] = g_idx.to(torch.int32)
    return out


def _grid_layout(t: Tensors, shape: Shape, meta: Meta) -> Optional[Layout]:
    if meta.get("g_idx"):
        return None  # act-order groups: columns of a group are scattered
    c = shape[1]
    gs = c if meta["groupsize"] == -1 else meta["groupsize"]
    zeros = unpack_codes(t["zeros"], -(-c // gs)).float()  # (r, G)
    scale = t["scales"].float()
    return [grid_planes(unpack_codes(t["codes"], c), meta["bits"], scale, -scale * zeros, gs, stored_planes=t["codes"],
                        values=GridValues(scale, zeros))]


GRID_FORMAT = register_format(Format("grid", _grid_fields, _grid_decode, lambda shape, meta: float(meta["bits"]),
                                     _grid_layout))


# ----------------------------------------------------------------------------- mixed (SliM-LLM)

def mixed_columns(group_bits: list[int], cols: int, groupsize: int) -> dict[int, Tensor]:
    """For each width in ``group_bits``: (n,) the columns of the groups at that width, in order."""
    out: dict[int, list[int]] = {}
    for g, b in enumerate(group_bits):
        out.setdefault(b, []).extend(range(g * groupsize, min((g + 1) * groupsize, cols)))
    return {b: torch.tensor(c, dtype=torch.long) for b, c in sorted(out.items())}


def _mixed_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    gb, gs = meta["group_bits"], meta["groupsize"]
    if len(gb) != _grid_groups(c, gs) or not all(isinstance(b, int) and 1 <= b <= 8 for b in gb):
        raise ValueError(f"group_bits must list {_grid_groups(c, gs)} widths in 1..8, got {gb!r}")
    f = {"scales": FieldSpec((r, len(gb)), scale_dtype(meta), "scales"),
         "zeros": FieldSpec((max(gb), r, packed_len(len(gb))), torch.uint8, "zero points")}
    for b, cols in mixed_columns(gb, c, gs).items():
        f[f"codes{b}"] = FieldSpec((b, r, packed_len(len(cols))), torch.uint8, f"{b}-bit codes")
    return f


def _mixed_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r, c = shape
    gb, gs = meta["group_bits"], meta["groupsize"]
    dev = t["scales"].device
    codes = torch.zeros(r, c, dtype=torch.uint8, device=dev)
    for b, cols in mixed_columns(gb, c, gs).items():
        codes[:, cols.to(dev)] = unpack_codes(t[f"codes{b}"], len(cols))
    zeros = unpack_codes(t["zeros"], len(gb))  # (r, G)
    if bool((zeros >= 2 ** torch.tensor(gb, device=dev)).any()):
        raise ValueError("a zero point lies outside its group's grid")
    idx = grid_index(c, gs, dev)
    return grid_values(codes, _per_column(t["scales"].float(), idx), _per_column(zeros, idx))


def mixed_pack(codes: Tensor, scales: Tensor, zeros: Tensor, meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed mixed-precision fields: each group's (r, n) codes at its own width, the zeros at the widest."""
    gb, gs = meta["group_bits"], meta["groupsize"]
    codes, zeros = codes.round().to(torch.int32), zeros.round().to(torch.int32)
    out = {"scales": scales.to(scale_dtype(meta)), "zeros": pack_codes(zeros, max(gb))}
    for b, cols in mixed_columns(gb, codes.shape[1], gs).items():
        out[f"codes{b}"] = pack_codes(codes[:, cols.to(codes.device)].contiguous(), b)
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
    for b, cols in mixed_columns(gb, shape[1], gs).items():
        groups = torch.tensor([g for g, w in enumerate(gb) if w == b], dtype=torch.long, device=scale.device)
        s, z = scale[:, groups], zeros[:, groups]
        out.append(grid_planes(unpack_codes(t[f"codes{b}"], len(cols)), b, s, -s * z, gs, cols.to(scale.device),
                               stored_planes=t[f"codes{b}"], values=GridValues(s, z)))
    return out


MIXED_FORMAT = register_format(Format("mixed", _mixed_fields, _mixed_decode, _mixed_weight_bits, _mixed_layout,
                                      map_bytes=lambda meta: len(meta["group_bits"])))


# ----------------------------------------------------------------------------- sign

def sign_values(s: Tensor, scale: Tensor, mean: Optional[Tensor]) -> Tensor:
    """``scale * (+-1) (+ mean)``; scale and mean broadcast against the (r, c) bool signs."""
    q = scale * pm1(s)
    return q + mean if mean is not None else q


def _sign_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    f = {"signs": FieldSpec((r, packed_len(c)), torch.uint8, "signs"),
         "scales": FieldSpec((1, r), scale_dtype(meta), "scales")}
    if meta["centred"]:
        f["means"] = FieldSpec((1, r), scale_dtype(meta), "means")
    return f


def _sign_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    mean = t["means"].float().t() if meta["centred"] else None
    return sign_values(unpack_bits(t["signs"], shape[1]), t["scales"].float().t(), mean)


def _sign_layout(t: Tensors, shape: Shape, meta: Meta) -> Layout:
    s = unpack_bits(t["signs"], shape[1]).to(torch.int32)
    alpha = t["scales"].float().t()  # (r, 1)
    mean = t["means"].float().t() if meta["centred"] else torch.zeros_like(alpha)
    return [grid_planes(s, 1, 2 * alpha, mean - alpha, shape[1], stored_planes=t["signs"].unsqueeze(0),
                        values=GridValues(alpha, shift=mean if meta["centred"] else None, signed=True))]


SIGN_FORMAT = register_format(Format("sign", _sign_fields, _sign_decode, lambda shape, meta: 1.0, _sign_layout))


# ----------------------------------------------------------------------------- pbllm

def pbllm_values(salient: Tensor, codes: Tensor, signs: Tensor, alpha: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """PB-LLM: the grid value ``scale * (code - zero)`` on salient entries, ``alpha * (+-1)`` elsewhere."""
    return torch.where(salient, grid_values(codes, scale, zero), alpha * pm1(signs))


def _pbllm_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    n, bits, nb = meta["n_salient"], meta["salient_bits"], _n_blocks(c, meta["blocksize"])
    return {"salient_mask": FieldSpec((r, packed_len(c)), torch.uint8, "salient bitmap"),
            "codes": FieldSpec((bits, packed_len(n)), torch.uint8, "codes"),
            "signs": FieldSpec((packed_len(r * c - n),), torch.uint8, "signs"),
            "scales": FieldSpec((nb, 2, r), scale_dtype(meta), "scales"),
            "zeros": FieldSpec((bits, r, packed_len(nb)), torch.uint8, "zero points")}


def _pbllm_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r, c = shape
    n, nb = meta["n_salient"], _n_blocks(c, meta["blocksize"])
    m = unpack_bits(t["salient_mask"], c)  # (r, c)
    if int(m.sum()) != n:
        raise ValueError(f"the salient bitmap has {int(m.sum())} entries set, the map says {n}")
    codes = torch.zeros(r, c, dtype=torch.uint8, device=m.device)
    codes[m] = unpack_codes(t["codes"], n)
    signs = torch.zeros(r, c, dtype=torch.bool, device=m.device)
    signs[~m] = unpack_bits(t["signs"], r * c - n)
    blk = _block_index(c, meta["blocksize"], m.device)
    sc = t["scales"].float()
    zeros = unpack_codes(t["zeros"], nb)  # (r, nb)
    return pbllm_values(m, codes, signs, _per_column(sc[:, 0, :].t(), blk), _per_column(sc[:, 1, :].t(), blk),
                        _per_column(zeros, blk))


def pbllm_pack(salient: Tensor, codes: Tensor, signs: Tensor, alpha: Tensor, scale: Tensor, zeros: Tensor,
               meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed PB-LLM fields from full (r, c) mask/codes/signs and (nb, r) alpha, scale, zeros."""
    bits = meta["salient_bits"]
    return {"salient_mask": pack_bits(salient), "codes": pack_codes(codes[salient], bits),
            "signs": pack_bits(signs[~salient]), "scales": torch.stack([alpha, scale], dim=1).to(scale_dtype(meta)),
            "zeros": pack_codes(zeros.t().round().to(torch.int32).contiguous(), bits)}


def _pbllm_weight_bits(shape: Shape, meta: Meta) -> float:
    f = meta["n_salient"] / (shape[0] * shape[1])
    return meta["salient_bits"] * f + (1 - f)


# no layout: the salient bitmap is unstructured, so every call decodes the whole weight
PBLLM_FORMAT = register_format(Format("pbllm", _pbllm_fields, _pbllm_decode, _pbllm_weight_bits))


# ----------------------------------------------------------------------------- arb (ARB-LLM)
#
# ``signs`` (r, c) first sign plane; ``signs2`` (r, k) second plane of the k salient columns;
# ``group`` (r, c-k) bitmap of the non-salient entries (1 = sparse group); ``salient_mask`` (c,);
# ``scales`` (nb, 4, r) row scales per block, slots as :data:`ARB_SLOTS`. Then either (ARB-RC,
# ``meta['rc']``) ``col_scales`` (2, c): on a non-salient column the concentrated and sparse
# groups' column scales, on a salient column those of its two passes; or (ARB, ARB-X) ``means``
# (nb, 3, r): one mean per block, row and group (concentrated, sparse, salient).

ARB_SLOTS = ("concentrated", "sparse", "salient1", "salient2")


def arb_values(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Tensor, scales: Tensor, means: Optional[Tensor],
               col_scales: Optional[Tensor], blocksize: int) -> Tensor:
    """Decode ARB-LLM from unpacked bits.

    Args:
        s1, s2: (r, c) bool sign planes (``s2`` used on salient columns only).
        salient: (c,) bool salient-column flags.
        sparse: (r, c) bool, True for the sparse group (ignored on salient columns).
        scales: (nb, 4, r) float32 row scales, slots as :data:`ARB_SLOTS`.
        means: (nb, 3, r) float32 means (concentrated, sparse, salient) or None (ARB-RC).
        col_scales: (2, c) float32 column scales (ARB-RC) or None.
        blocksize: columns per block.

    Returns:
        (r, c) float32: ``a * s1`` with the entry's group row scale ``a`` (times its column scale), plus
        the second pass on salient columns, plus the group's mean when there are means.
    """
    blk = _block_index(s1.shape[1], blocksize, s1.device)
    sal = salient.unsqueeze(0)  # (1, c)

    def slot(t: Tensor, i: int) -> Tensor:
        return _per_column(t[:, i, :].t(), blk)  # (r, c)

    a1 = torch.where(sal, slot(scales, 2), torch.where(sparse, slot(scales, 1), slot(scales, 0)))
    a2 = torch.where(sal, slot(scales, 3), 0.0)
    if col_scales is not None:
        a1 = a1 * torch.where(sparse & ~sal, col_scales[1:2], col_scales[0:1])
        a2 = a2 * col_scales[1:2]
    q = a1 * pm1(s1) + a2 * pm1(s2)
    if means is not None:
        q = q + torch.where(sal, slot(means, 2), torch.where(sparse, slot(means, 1), slot(means, 0)))
    return q


def _arb_fields(shape: Shape, meta: Meta) -> dict[str, FieldSpec]:
    r, c = shape
    k, nb, sd = meta["n_salient"], _n_blocks(c, meta["blocksize"]), scale_dtype(meta)
    f = {"signs": FieldSpec((r, packed_len(c)), torch.uint8, "signs"),
         "signs2": FieldSpec((r, packed_len(k)), torch.uint8, "salient 2nd signs"),
         "group": FieldSpec((r, packed_len(c - k)), torch.uint8, "group bitmap"),
         "salient_mask": FieldSpec((packed_len(c),), torch.uint8, "salient-column mask"),
         "scales": FieldSpec((nb, 4, r), sd, "scales")}
    if meta["rc"]:
        f["col_scales"] = FieldSpec((2, c), sd, "column scales")
    else:
        f["means"] = FieldSpec((nb, 3, r), sd, "means")
    return f


def arb_pack(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Tensor, scales: Tensor, means: Optional[Tensor],
             col_scales: Optional[Tensor], meta: Meta) -> Tensors:
    """Packed ARB-LLM fields from full (r, c) bool planes and float32 scales (and means or column scales)."""
    sd = scale_dtype(meta)
    out = {"signs": pack_bits(s1), "signs2": pack_bits(s2[:, salient].contiguous()),
           "group": pack_bits(sparse[:, ~salient].contiguous()), "salient_mask": pack_bits(salient),
           "scales": scales.to(sd)}
    if col_scales is not None:
        out["col_scales"] = col_scales.to(sd)
    if means is not None:
        out["means"] = means.to(sd)
    return out


def _arb_decode(t: Tensors, shape: Shape, meta: Meta) -> Tensor:
    r, c = shape
    k = meta["n_salient"]
    s1, sal = unpack_bits(t["signs"], c), unpack_bits(t["salient_mask"], c)
    if int(sal.sum()) != k:
        raise ValueError(f"the salient-column mask has {int(sal.sum())} columns set, the map says {k}")
    sparse = torch.zeros(r, c, dtype=torch.bool, device=s1.device)
    sparse[:, ~sal] = unpack_bits(t["group"], c - k)
    s2 = torch.zeros(r, c, dtype=torch.bool, device=s1.device)
    s2[:, sal] = unpack_bits(t["signs2"], k)
    means = None if meta["rc"] else t["means"].float()
    cols = t["col_scales"].float() if meta["rc"] else None
    return arb_values(s1, sal, sparse, s2, t["scales"].float(), means, cols, meta["blocksize"])


def _arb_weight_bits(shape: Shape, meta: Meta) -> float:
    return (shape[1] + meta["n_salient"]) / shape[1]  # one sign plane, a second on the salient columns


# no layout: column scales (RC) and one mean per group have no fast path yet; every call decodes
ARB_FORMAT = register_format(Format("arb", _arb_fields, _arb_decode, _arb_weight_bits))
