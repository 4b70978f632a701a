"""Stored forms of quantized weights: which packed tensors each method keeps, and how they decode.

A :class:`StoredWeight` is what a checkpoint holds for one quantized linear: a format name, the
weight's shape, a few scalar attributes (``meta``) and packed tensors. Each format declares its
fields (shape, dtype and what the bytes are spent on) so a file can be validated before use,
and a ``decode`` function that turns the packed tensors back into the (rows, cols) float32
weights. The methods build their simulated weights *through the same decoding*, so a loaded
checkpoint reproduces the in-memory quantized model bit for bit.

Each method's module (:mod:`billm.methods`) defines and registers its own format beside its config
and quantizer; :func:`registered_formats` lists the registered ones. This module holds what every format
shares: the field and format declarations, the registry, :func:`storage_bits` and small helpers.

Bit planes and bitmaps are packed 8 to a byte along the input dimension (:mod:`billm.kernels.bitpack`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..config import SCALE_DTYPES
from ..errors import QuantizationError
from ..kernels.bitpack import pack_bits, packed_len
from ..kernels.layout import Layout

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
class SignPlanes:
    """Sign planes of a format that block reconstruction may flip, through latent weights (straight-through).

    Attributes:
        fields: the stored fields holding them.
        unpack: ``(tensors, shape, meta) -> {field: bool tensor}``, True for +1.
        pack: ``({field: bool tensor}, shape, meta) -> {field: stored tensor}``, the inverse.
        decode: ``(tensors, {field: float +-1 tensor}, shape, meta) -> (rows, cols) float32``: the format's decode
            with the planes given as floats (the gradient reaches them), bit for bit ``Format.decode`` when they
            are the stored planes.
    """

    fields: tuple[str, ...]
    unpack: Callable[[Tensors, Shape, Meta], dict[str, Tensor]]
    pack: Callable[[dict[str, Tensor], Shape, Meta], dict[str, Tensor]]
    decode: Callable[[Tensors, dict[str, Tensor], Shape, Meta], Tensor]


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
        tunable: the fields holding continuous values that block reconstruction may tune
            (:mod:`billm.reconstruct`); None: every floating-point field (scales, means).
        signs: the sign planes block reconstruction may flip (``reconstruct_signs``); None: none.
    """

    name: str
    fields: Callable[[Shape, Meta], dict[str, FieldSpec]]
    decode: Callable[[Tensors, Shape, Meta], Tensor]
    weight_bits: Callable[[Shape, Meta], float]
    layout: Optional[Callable[[Tensors, Shape, Meta], Optional[Layout]]] = None
    map_bytes: Callable[[Meta], int] = lambda meta: 0
    tunable: Optional[tuple[str, ...]] = None
    signs: Optional[SignPlanes] = None


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    """Make ``fmt`` known to the loader, ``inspect`` and :class:`~billm.packing.linear.PackedLinear`; returns it."""
    FORMATS[fmt.name] = fmt
    return fmt


def registered_formats() -> list[str]:
    """Names of the registered formats."""
    return sorted(FORMATS)


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

    def decode(self) -> Tensor:
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


def pack_planes(planes: dict[str, Tensor], shape: Shape, meta: Meta) -> dict[str, Tensor]:
    """Bool sign planes ``{field: (rows, n) bool}`` packed as stored, a row at a time (a ``SignPlanes.pack`` for formats
    whose planes are stored as plain packed bits)."""
    return {f: pack_bits(b.contiguous()) for f, b in planes.items()}


def pm1(bits: Tensor) -> Tensor:
    """Bool sign bits to float32 +1 / -1."""
    return torch.where(bits, 1.0, -1.0)


def per_column(t: Tensor, col_group: Tensor) -> Tensor:
    """(rows, G) per-group values to (rows, cols) via the group index of each column (read-only: one group
    is a broadcast view, not a copy)."""
    if t.shape[1] == 1 and col_group.numel():  # one group (a block's own decode): every index is 0
        return t.expand(t.shape[0], col_group.numel())
    return t.index_select(1, col_group)  # the same as t[:, col_group], several times faster on the CPU


def block_index(cols: int, blocksize: int, device) -> Tensor:
    return torch.arange(cols, device=device) // blocksize  # (cols,)


def n_blocks(cols: int, blocksize: int) -> int:
    return math.ceil(cols / blocksize)
