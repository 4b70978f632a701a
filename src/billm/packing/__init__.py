"""Bit-packed storage: stored-weight formats, ``PackedLinear`` and the checkpoint.

Layers: :mod:`.formats` (each format's fields, decode, bits and fast-path layout) sits on
:mod:`billm.kernels` (bit packing, layouts, kernels); :mod:`.linear` on both; :mod:`.checkpoint`
on all of them. Nothing here imports the methods or the model walker.
"""

from ..kernels.bitpack import pack_bits, pack_codes, unpack_bits, unpack_codes
from .formats import FORMATS, Format, StoredWeight, get_format, register_format, storage_bits

__all__ = ["FORMATS", "Format", "StoredWeight", "get_format", "pack_bits", "pack_codes", "register_format",
           "storage_bits", "unpack_bits", "unpack_codes"]
