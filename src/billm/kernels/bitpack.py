"""Pure bit packing: booleans 8 to a byte, and b-bit integer codes as b bit planes.

Bits are packed along the last dimension, least significant bit first: entry ``j`` of a row
lands in byte ``j // 8`` at bit ``j % 8``. A row whose length is not a multiple of 8 is padded
with zero bits, so every row starts on a byte boundary (rows can be unpacked independently).
"""

from __future__ import annotations

import torch
from torch import Tensor

_WEIGHTS: dict[torch.device, Tensor] = {}


def _bit_values(device: torch.device) -> Tensor:
    """(8,) uint8 on ``device``: bit j of a byte has value 2**j (made once per device, not copied per call)."""
    if device not in _WEIGHTS:
        _WEIGHTS[device] = 1 << torch.arange(8, dtype=torch.uint8, device=device)
    return _WEIGHTS[device]


def packed_len(n: int) -> int:
    """Bytes holding ``n`` bits."""
    return (n + 7) // 8


def pack_bits(x: Tensor) -> Tensor:
    """Pack a bool tensor (..., n) into uint8 (..., ceil(n/8)); padding bits are 0."""
    if x.dtype != torch.bool:
        raise TypeError(f"pack_bits needs a bool tensor, got {x.dtype}")
    n = x.shape[-1]
    pad = packed_len(n) * 8 - n
    if pad:
        x = torch.nn.functional.pad(x.to(torch.uint8), (0, pad)).bool()
    groups = x.reshape(*x.shape[:-1], packed_len(n), 8).to(torch.uint8)  # (..., ceil(n/8), 8)
    return (groups * _bit_values(x.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(p: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`: uint8 (..., ceil(n/8)) to bool (..., n)."""
    if p.dtype != torch.uint8:
        raise TypeError(f"unpack_bits needs a uint8 tensor, got {p.dtype}")
    if p.shape[-1] != packed_len(n):
        raise ValueError(f"{p.shape[-1]} bytes cannot hold exactly {n} bits (need {packed_len(n)})")
    bits = (p.unsqueeze(-1) & _bit_values(p.device)) != 0  # (..., ceil(n/8), 8)
    return bits.reshape(*p.shape[:-1], p.shape[-1] * 8)[..., :n]


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack integer codes in [0, 2**bits) (..., n) into ``bits`` planes: uint8 (bits, ..., ceil(n/8)).

    Plane ``i`` holds bit ``i`` of every code, so the file spends exactly ``bits`` bits a code
    (plus row padding) for any width from 1 to 8.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    c = codes if codes.dtype == torch.uint8 else codes.to(torch.int32)  # uint8 as it is: no copy four times its size
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    return torch.stack([pack_bits(((c >> i) & 1).bool()) for i in range(bits)])


def unpack_codes(planes: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_codes`: uint8 (bits, ..., ceil(n/8)) to uint8 codes (..., n)."""
    out = torch.zeros(planes.shape[1:-1] + (n,), dtype=torch.uint8, device=planes.device)
    for i in range(planes.shape[0]):
        out |= unpack_bits(planes[i], n).to(torch.uint8) << i
    return out
