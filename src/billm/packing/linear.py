"""``PackedLinear``: a linear layer that keeps only its packed weight and decodes it per call.

The one representation of a quantized linear: :func:`billm.quantize` swaps each linear for one
as soon as it is quantized (the next block's inputs flow through its decode path),
:func:`billm.save` reads them off the model, and :func:`billm.load` builds them again.
"""

from __future__ import annotations

import functools
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import BillmError
from ..kernels import choose_path, packed_matmul, requested_kernel
from ..kernels.decode import can_decode
from ..kernels.layout import flatten, unflatten
from .formats import ROTATION_FIELD, StoredWeight, layer_fields
from .rotation import Rotation

PREFIX = "packed_"  # packed fields are buffers named packed_<field>: "<layer>.packed_signs" in a checkpoint


@functools.lru_cache(maxsize=4096)
def _spec(spec: str) -> dict:
    return json.loads(spec)


def _packed_linear(x: Tensor, layout_tensors: list[Tensor], stored_tensors: list[Tensor], bias: Optional[Tensor],
                   spec: str, kernel: str) -> Tensor:
    s = _spec(spec)
    layout = unflatten(s["layout"], layout_tensors) if s["layout"] is not None else None
    path = choose_path(requested_kernel(kernel or None), x, layout is not None, can_decode(layout))
    if path == "dequant":
        st = StoredWeight(s["format"], tuple(s["shape"]), dict(s["meta"]), dict(zip(s["fields"], stored_tensors)))
        return F.linear(x, st.decode().to(x.dtype), bias)  # (out, in) float32 weight, for this call only
    return packed_matmul(x, layout, path, bias).contiguous()  # lut's is a transposed view; the fake promises contiguous


@torch.library.custom_op("billm::packed_linear", mutates_args=())
def packed_linear(x: Tensor, layout_tensors: list[Tensor], stored_tensors: list[Tensor], bias: Optional[Tensor],
                  spec: str, kernel: str) -> Tensor:
    """``x (..., in) W^T + bias`` of a packed weight, by the path :func:`billm.kernels.choose_path` picks.

    A registered operator (``torch.ops.billm.packed_linear``), so ``torch.compile`` keeps a
    ``PackedLinear`` in its graph as one opaque call, its shape known from :func:`_fake` (no graph break).
    Eager calls go straight to the same function.

    Args:
        x: the (already rotated) input, (..., in).
        layout_tensors: the fast paths' planes (:func:`billm.kernels.layout.flatten`), [] when not built.
        stored_tensors: the stored fields, in the order ``spec['fields']`` names them (the ``dequant`` path).
        bias: (out,) in x's dtype, or None.
        spec: JSON: ``format``, ``shape``, ``meta``, ``fields``, and ``layout`` (the flattened layout's description).
        kernel: the layer's own path choice, or "" for ``$BILLM_KERNEL`` / ``auto``.
    """
    return _packed_linear(x, layout_tensors, stored_tensors, bias, spec, kernel)


@packed_linear.register_fake
def _fake(x, layout_tensors, stored_tensors, bias, spec, kernel):
    return x.new_empty((*x.shape[:-1], _spec(spec)["shape"][0]))


@dataclass
class OpInputs:
    """A layer's arguments to :func:`packed_linear` (and the rotation applied before), with the key they were built for."""

    key: tuple
    layout_tensors: list[Tensor]
    stored_tensors: list[Tensor]
    spec: str
    rotation: Optional[Rotation]


class PackedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` (or GPT-2's ``Conv1D``) holding a :class:`StoredWeight`.

    The packed tensors are buffers (they move with ``.to(device)`` and are saved in the state
    dict as ``<name>.packed_<field>``). A forward call takes one of the paths of
    :mod:`billm.kernels`: a few tokens on CPU multiply straight from the bit planes (lookup
    tables), CUDA inputs go through the Triton kernels, and otherwise the full weight is decoded
    on the buffers' device for that call only. The fast paths read a column-aligned copy of the
    planes (the format's ``layout``, about 3 bits a weight for BiLLM), built on first
    use and kept with the layer, outside the state dict. A weight quantized with an input rotation
    (incoherence processing, :mod:`.rotation`) keeps its sign vector as one more packed buffer, and
    every call first rotates its input: ``y = (x R) Ŵᵀ``.

    Args:
        fmt: stored-weight format name (a key of :data:`billm.packing.formats.FORMATS`).
        shape: (out_features, in_features).
        meta: the format's scalar attributes.
        bias: whether the layer has a bias.
        dtype: dtype of the bias.
        device: where the (empty) buffers are created; ``meta`` for a skeleton to be filled with
            ``load_state_dict(..., assign=True)``.
        source: class name of the module it replaced (``Linear``, ``Conv1D``), kept in the checkpoint's map.
    """

    def __init__(self, fmt: str, shape: tuple[int, int], meta: dict[str, Any], bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: Any = "meta", source: str = "Linear") -> None:
        super().__init__()
        self.format, self.meta, self.source = fmt, dict(meta), source
        self.out_features, self.in_features = int(shape[0]), int(shape[1])
        for name, spec in layer_fields(fmt, self.shape, self.meta).items():
            self.register_buffer(PREFIX + name, torch.empty(spec.shape, dtype=spec.dtype, device=device))
        self.bias = nn.Parameter(torch.empty(self.out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.kernel: Optional[str] = None  # None: $BILLM_KERNEL or "auto" (see billm.kernels)
        self._layout: Any = None
        self._layout_key: Any = None
        self._rotation: Optional[Rotation] = None
        self._rotation_key: Any = None
        self._decoded: Optional[Tensor] = None  # keep_decoded() / decode_once(): the decoded weight, reused
        self._op: Optional[OpInputs] = None  # prepare(): what a call hands the custom op

    @classmethod
    def from_stored(cls, stored: StoredWeight, bias: Optional[Tensor] = None, source: str = "Linear") -> "PackedLinear":
        """A ready layer from a stored weight (and an optional bias), sharing the stored tensors."""
        ref = next(iter(stored.tensors.values()))
        layer = cls(stored.format, stored.shape, stored.meta, bias is not None,
                    bias.dtype if bias is not None else torch.float32, device=ref.device, source=source)
        fields = stored.fields()
        if set(fields) != set(stored.tensors):
            raise ValueError(f"format {stored.format!r} needs fields {sorted(fields)}, got {sorted(stored.tensors)}")
        for name, t in stored.tensors.items():
            if tuple(t.shape) != tuple(fields[name].shape) or t.dtype != fields[name].dtype:
                raise ValueError(f"format {stored.format!r}: field {name!r} is {tuple(t.shape)} {t.dtype}, the format "
                                 f"declares {tuple(fields[name].shape)} {fields[name].dtype}")
            setattr(layer, PREFIX + name, t)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    def _apply(self, fn, recurse: bool = True):
        """``.to(device)`` moves the packed buffers; ``.to(dtype)`` / ``.half()`` never recasts them (only the bias).

        A packed field's dtype is part of its format: rounding float32 scales to fp16 would silently
        change the quantized weights.
        """
        packed = {n: b for n, b in self._buffers.items() if n.startswith(PREFIX) and b is not None}
        self._decoded = None  # a kept decoded copy (see decode_once) does not follow moves
        self._op = None  # nor the custom op's inputs
        out = super()._apply(fn, recurse)
        for n, b in packed.items():
            new = self._buffers[n]
            if new is not None and new.dtype != b.dtype:
                self._buffers[n] = b.to(device=new.device)
        return out

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features)."""
        return (self.out_features, self.in_features)

    def stored(self) -> StoredWeight:
        """The packed weight as a :class:`StoredWeight` (sharing this layer's buffers)."""
        tensors = {n[len(PREFIX):]: b for n, b in self.named_buffers(recurse=False) if n.startswith(PREFIX)}
        return StoredWeight(self.format, self.shape, self.meta, tensors)

    def replace_fields(self, tensors: dict[str, Tensor]) -> None:
        """Replace some packed fields by new tensors of the same shape, dtype and device (block reconstruction's
        tuned scales); everything derived from the buffers (the kept decoded weight, the fast paths' layout, the
        rotation) is rebuilt on next use. ``replace_fields({})`` only drops those (e.g. ones built in inference
        mode, which autograd cannot use).

        Raises:
            ValueError: a field the layer does not have, or a tensor unlike the one it replaces.
        """
        for name, t in tensors.items():
            old = getattr(self, PREFIX + name, None)
            if old is None or t.shape != old.shape or t.dtype != old.dtype or t.device != old.device:
                raise ValueError(f"replace_fields: {name!r} must replace a packed field of the same shape, dtype "
                                 f"and device")
            setattr(self, PREFIX + name, t)
        self._decoded, self._layout, self._layout_key, self._rotation, self._rotation_key = None, None, None, None, None
        self._op = None  # the custom op's inputs hold the old tensors

    @property
    def weight(self) -> Tensor:
        """The decoded (out, in) weight in the input's own basis, float32 (``Ŵ Rᵀ`` for a rotated layer;
        computed on every access; for inspection)."""
        w = self.stored().decode()
        rot = self.rotation()
        return w if rot is None else rot.unrotate(w)

    def rotation(self) -> Optional[Rotation]:
        """The input rotation the layer applies (None: none), rebuilt if its buffer moved."""
        buf = getattr(self, PREFIX + ROTATION_FIELD, None)
        if buf is None:
            return None
        key = (buf.device, buf.data_ptr())
        if self._rotation_key != key:
            self._rotation = Rotation.of(self.stored())
            self._rotation_key = key
        return self._rotation

    def layout(self) -> Any:
        """The fast paths' column-aligned planes (None for a format without one), rebuilt if the buffers moved."""
        ref = next(b for n, b in self.named_buffers(recurse=False) if n.startswith(PREFIX))
        key = (ref.device, ref.data_ptr())
        if self._layout_key != key:
            self._layout = self.stored().layout()
            self._layout_key = key
        return self._layout

    def keep_decoded(self, w: Tensor) -> None:
        """Hold ``w``, this layer's decoded (out, in) weight (``stored().decode()``, e.g. from a check just made),
        for the next :func:`decode_once`; dropped by it, or by any move of the layer.

        ``w`` is float32, or already cast to the dtype of the inputs the layer will see (half the memory for an
        fp16 model): the forward casts the weight to the input's dtype anyway, so both give the very same
        outputs. An input of another dtype decodes the weight anew instead (never a lossy copy upcast).

        Raises:
            ValueError: ``w`` is not this layer's shape, a floating dtype, on its buffers' device.
        """
        ref = next(b for n, b in self.named_buffers(recurse=False) if n.startswith(PREFIX))
        if tuple(w.shape) != self.shape or not w.is_floating_point() or w.device != ref.device:
            raise ValueError(f"keep_decoded: expected a floating {self.shape} tensor on {ref.device}, "
                             f"got {w.dtype} {tuple(w.shape)} on {w.device}")
        self._decoded = w

    def prepare(self) -> "OpInputs":
        """What a call hands :func:`packed_linear`, built when first needed and again when the buffers move or
        the path asked for changes between ``dequant`` (no layout built: it costs memory) and the others.

        Runs eagerly; a compiled forward (``torch.compile``) reads what the last eager call or
        :func:`prepare_model` left, as plain tensors and strings, so it traces without a graph break.
        """
        need_layout = requested_kernel(self.kernel) != "dequant"
        ref = next(b for n, b in self.named_buffers(recurse=False) if n.startswith(PREFIX))
        key = (ref.device, ref.data_ptr(), need_layout)
        if self._op is None or self._op.key != key:
            layout = self.layout() if need_layout else None
            spec, layout_tensors = flatten(layout) if layout is not None else (None, [])
            stored = self.stored()
            fields = sorted(stored.tensors)
            desc = {"format": stored.format, "shape": list(stored.shape), "meta": stored.meta, "fields": fields,
                    "layout": spec}
            self._op = OpInputs(key, layout_tensors, [stored.tensors[f] for f in fields], json.dumps(desc),
                                self.rotation())
        return self._op

    def forward(self, x: Tensor) -> Tensor:
        if self._decoded is not None or (x.requires_grad and torch.is_grad_enabled()):
            return self._decoded_forward(x)  # gradients, or a kept decoded weight (quantize's propagation)
        if torch.compiler.is_compiling():
            if self._op is None:
                raise BillmError("a PackedLinear must run once, or billm.prepare_model(model) run, before torch.compile")
            op = self._op
        else:
            op = self.prepare()
        if op.rotation is not None:
            x = op.rotation.input(x)  # x R: the stored weight is W R quantized
        b = self.bias.to(x.dtype) if self.bias is not None else None
        call = packed_linear if torch.compiler.is_compiling() else _packed_linear  # eager: no dispatcher overhead
        return call(x, op.layout_tensors, op.stored_tensors, b, op.spec, self.kernel or "")

    def _decoded_forward(self, x: Tensor) -> Tensor:
        """``dequant`` outside the custom op: autograd flows to ``x`` (the packed weight has no gradient)."""
        rot = self.rotation()
        if rot is not None:
            x = rot.input(x)
        w = self._decoded  # (out, in): float32, or a copy in x's dtype
        if w is None or w.dtype not in (torch.float32, x.dtype):
            w = self.stored().decode()
        return F.linear(x, w.to(x.dtype), self.bias.to(x.dtype) if self.bias is not None else None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, bias={self.bias is not None}"


@contextmanager
def decode_once(layers: Iterable[PackedLinear]) -> Iterator[None]:
    """Within: each layer's decode path reuses one decoded copy of its weight instead of decoding per call.

    For many forward calls in a row on the same layers (the calibration batches of a propagation
    pass); the outputs are the very same as without it. A layer that already holds its decoded
    weight (:meth:`PackedLinear.keep_decoded`, on its buffers' device) is not decoded again. The
    copies are dropped on exit.
    """
    layers = list(layers)
    try:
        for m in layers:
            if m._decoded is None:
                m._decoded = m.stored().decode()
        yield
    finally:
        for m in layers:
            m._decoded = None


def prepare_model(model: nn.Module) -> int:
    """Build every PackedLinear's custom-op inputs (layout, rotation) now, as a first call would: do it before
    ``torch.compile``, whose traced forward reads them as they are. Returns how many layers it prepared."""
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.prepare()
            n += 1
    return n


def set_kernel(model: nn.Module, name: Optional[str]) -> int:
    """Force a path (:data:`billm.kernels.KERNELS`, or None for the default) on every PackedLinear of ``model``.

    Returns:
        How many layers it set.
    """
    if name is not None:
        requested_kernel(name)  # a wrong name fails before any layer changes
    n = 0
    for m in model.modules():
        if isinstance(m, PackedLinear):
            m.kernel = name
            n += 1
    return n
