"""Incoherence processing: a layer quantized in a randomly rotated basis, the rotation stored with it.

With ``R = D · Hn`` orthogonal (random ±1 signs ``D``, orthonormal block Hadamard ``Hn``, see
:mod:`billm.kernels.hadamard`), ``x Wᵀ = (x R)(W R)ᵀ``. The driver hands the method ``W R`` and
``Rᵀ H R`` instead of ``W`` and ``H`` (:meth:`Rotation.weight`, :meth:`Rotation.hessian`); the
method quantizes as usual, and :meth:`Rotation.attach` adds the rotation to its stored weight: the
sign vector, bit-packed, as one more field (:data:`~billm.packing.formats.ROTATION_FIELD`, counted in
the storage bits, saved and loaded like any field) and ``rotate`` / ``rotate_block`` in its meta. A
:class:`~billm.packing.linear.PackedLinear` holding such a weight applies ``x ↦ x R`` to its input
before whatever path multiplies. Nothing of this depends on the format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from ..kernels.bitpack import pack_bits, unpack_bits
from ..kernels.hadamard import hadamard_block, random_signs, rotate, rotate_hessian, unrotate
from .formats import ROTATION_FIELD, StoredWeight


@dataclass(frozen=True)
class Rotation:
    """``R = D · Hn`` of one layer: ``signs`` (n,) float32 ±1 (the diagonal D), Hadamard blocks of ``block``."""

    signs: Tensor
    block: int

    @classmethod
    def make(cls, kind: str, n: int, seed: int, device: Any = None) -> Optional["Rotation"]:
        """The rotation a config asks for (``kind`` = its ``rotate``) of an ``n``-wide input; None for ``none``.

        The signs depend on ``seed`` and ``n`` only (drawn on the CPU), so every layer of one width
        shares one rotation.
        """
        if kind == "none":
            return None
        if kind != "hadamard":
            raise ValueError(f"unknown rotation {kind!r}; choose none or hadamard")
        signs = torch.where(random_signs(n, seed), 1.0, -1.0)
        return cls(signs.to(device), hadamard_block(n))

    @classmethod
    def of(cls, stored: StoredWeight) -> Optional["Rotation"]:
        """The rotation a stored weight carries (None when it has none)."""
        if stored.meta.get("rotate") is None:
            return None
        bits = unpack_bits(stored.tensors[ROTATION_FIELD], stored.shape[1])  # (n,) bool
        return cls(torch.where(bits, 1.0, -1.0), int(stored.meta["rotate_block"]))

    def input(self, x: Tensor) -> Tensor:
        """``x R`` over the last dimension, in x's dtype: what a rotated layer multiplies its stored weight with."""
        return rotate(x, self.signs.to(x.device), self.block)

    def weight(self, W: Tensor) -> Tensor:
        """(rows, n) ``W R``: the weight the method quantizes."""
        return rotate(W, self.signs.to(W.device), self.block)

    def unrotate(self, W: Tensor) -> Tensor:
        """(rows, n) ``W Rᵀ``: a rotated-space weight back in the layer's own input basis."""
        return unrotate(W, self.signs.to(W.device), self.block)

    def hessian(self, H: Optional[Tensor]) -> Optional[Tensor]:
        """(n, n) ``Rᵀ H R``: the Hessian of the rotated inputs (None stays None)."""
        return None if H is None else rotate_hessian(H, self.signs.to(H.device), self.block)

    def attach(self, stored: StoredWeight) -> StoredWeight:
        """``stored`` (quantized in the rotated basis) with this rotation recorded: meta and the packed signs."""
        meta = {**stored.meta, "rotate": "hadamard", "rotate_block": self.block}
        ref = next(iter(stored.tensors.values()))
        signs = pack_bits((self.signs > 0).to(ref.device))  # (ceil(n/8),) uint8
        return StoredWeight(stored.format, stored.shape, meta, {**stored.tensors, ROTATION_FIELD: signs})
