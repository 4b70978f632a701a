"""Bit-packed storage: pure bit packing, stored-weight formats, ``PackedLinear`` and the checkpoint."""

from .bitpack import pack_bits, pack_codes, unpack_bits, unpack_codes
from .formats import FORMATS, StoredWeight

__all__ = ["FORMATS", "StoredWeight", "pack_bits", "pack_codes", "unpack_bits", "unpack_codes"]
