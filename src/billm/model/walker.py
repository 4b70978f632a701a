"""Generic model plumbing: find the decoder blocks and their linears, capture the first block's
inputs (with every keyword argument), and walk the blocks one at a time.

Nothing here matches on model names: blocks are the ``nn.ModuleList`` whose children are the
model's repeated block class (``_no_split_modules``), falling back to the longest ModuleList of
identical modules; linears are ``nn.Linear`` and GPT-2's ``Conv1D`` (a transposed linear).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import ModelError

log = logging.getLogger(__name__)

try:  # GPT-2 style models use a transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

Device = Union[str, torch.device]


def _decoder_root(model: nn.Module) -> tuple[str, nn.Module]:
    """The language decoder of a model (``get_decoder()``), so a vision tower is never taken for it."""
    get = getattr(model, "get_decoder", None)
    if callable(get):
        try:
            dec = get()
        except (AttributeError, NotImplementedError, TypeError):
            dec = None
        if isinstance(dec, nn.Module) and dec is not model:
            for name, mod in model.named_modules():
                if mod is dec:
                    return name, dec
    return "", model


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list of a model: (qualified name, ModuleList).

    Raises:
        ModelError: no repeated block list was found.
    """
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    root_name, root = _decoder_root(model)
    lists = [((f"{root_name}.{n}" if root_name else n), m) for n, m in root.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0]
    for name, ml in lists:
        if wanted and all(type(b).__name__ in wanted for b in ml):
            return name, ml
    same = [(n, m) for n, m in lists if len({type(b) for b in m}) == 1]
    if same:
        name, ml = max(same, key=lambda nm: len(nm[1]))
        return name, ml
    raise ModelError(f"no decoder-block list found in {type(model).__name__}: it has no nn.ModuleList of repeated blocks")


def is_linear(m: nn.Module) -> bool:
    """True for modules billm can quantize (``nn.Linear`` and GPT-2 ``Conv1D``)."""
    return isinstance(m, nn.Linear) or (bool(Conv1D) and isinstance(m, Conv1D))


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """Linears of a block by their name inside it, in module order."""
    return {n: m for n, m in block.named_modules() if is_linear(m)}


def select_linears(linears: dict[str, nn.Module], block_prefix: str, include: tuple[str, ...],
                   exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    """Filter linears with fnmatch patterns on the in-block name or the full name."""

    def hit(name: str, patterns: tuple[str, ...]) -> bool:
        full = f"{block_prefix}.{name}"
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(full, p) for p in patterns)

    return {n: m for n, m in linears.items() if hit(n, include) and not hit(n, exclude)}


def get_weight(m: nn.Module) -> Tensor:
    """The weight as (out_features, in_features): a view for nn.Linear (Conv1D is stored transposed), the
    decoded weight for a packed layer."""
    return m.weight.data.t() if bool(Conv1D) and isinstance(m, Conv1D) else m.weight.data



class _Captured(Exception):
    """Raised by the capture hook to stop the forward after the first block's inputs are seen."""


@dataclass
class BlockInputs:
    """The inputs of one block for every calibration batch.

    Attributes:
        hidden: per batch, the hidden states (batch, seq, hidden), kept on the offload device.
        kwargs: per batch, the other keyword arguments the block is called with.
    """

    hidden: list[Tensor]
    kwargs: list[dict[str, Any]]
    layer_kwargs: list[list[dict[str, Any]]] = dataclasses.field(default_factory=list)

    def for_block(self, batch: int, index: int) -> dict[str, Any]:
        """Keyword arguments of block ``index`` for ``batch``: block 0's, with that block's own overrides."""
        if not self.layer_kwargs or not self.layer_kwargs[batch][index]:
            return self.kwargs[batch]
        return {**self.kwargs[batch], **self.layer_kwargs[batch][index]}


def _to(obj: Any, device: Device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b.to(a.device)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)


def _move_outside_blocks(model: nn.Module, blocks_name: str, device: Device) -> None:
    """Move every parameter and buffer that is not inside the block list (embeddings, norms, rotary); an empty
    (``meta``) one stays empty (an empty model's head, read only after the blocks)."""
    prefix = blocks_name + "."
    for name, mod in model.named_modules():
        if name == blocks_name or name.startswith(prefix):
            continue
        for _, p in list(mod.named_parameters(recurse=False)):
            if not p.is_meta:
                p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
            if not b.is_meta:
                mod._buffers[bname] = b.to(device)


def _split_call(block: nn.Module, args: tuple, kw: dict) -> tuple[Tensor, dict[str, Any]]:
    """Name every argument of a block call: (hidden states, all other arguments as keywords).

    Some families pass masks positionally (GPT-2); binding to the forward signature makes the
    call replayable with keywords only.
    """
    sig = inspect.signature(block.forward)
    try:
        bound = sig.bind(*args, **kw)
    except TypeError as e:
        raise ModelError(f"cannot replay the call of {type(block).__name__}: {e}") from e
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif sig.parameters[name].kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ModelError(f"{type(block).__name__} takes *args; billm cannot replay its inputs")
        else:
            named[name] = value
    first = next(iter(sig.parameters))
    hidden = named.pop(first)
    if not isinstance(hidden, Tensor):
        raise ModelError(f"the first input of {type(block).__name__} is not a tensor of hidden states")
    return hidden, named


class _Recorder(nn.Module):
    """Stands in for a decoder block during a probe: records its call, passes the hidden states on."""

    def __init__(self, real: nn.Module, index: int, seen: dict, template: dict, last: bool) -> None:
        super().__init__()
        self._real = [real]  # a list, so the real block is not registered (and not moved) as a submodule
        self._index, self._seen, self._template, self._last = index, seen, template, last

    def __getattr__(self, name: str) -> Any:  # the model may read block attributes (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._real[0], name)

    def forward(self, *args: Any, **kw: Any) -> Any:
        h, rest = _split_call(self._real[0], args, kw)
        self._seen[self._index] = rest
        if self._last:
            raise _Captured
        out = self._template["out"]
        return h if isinstance(out, Tensor) else (h,) + tuple(out[1:])


def _layer_overrides(model: nn.Module, blocks: nn.ModuleList, ids: Tensor, device: Device,
                     offload: Device) -> list[dict[str, Any]]:
    """Per block, the keyword arguments that differ from block 0's (sliding-window masks, local rotary ...).

    One probe forward of ``ids`` where block 0 runs for real and every later block is a
    :class:`_Recorder`: the model computes each layer's arguments as usual, at almost no cost.
    """
    n = len(blocks)
    if n == 1:
        return [{}]
    seen: dict[int, dict] = {}
    template: dict[str, Any] = {}
    originals = list(blocks)
    pre = originals[0].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__(0, _split_call(m, a, k)[1]), with_kwargs=True)
    post = originals[0].register_forward_hook(lambda m, a, o: template.__setitem__("out", o))
    try:
        for i in range(1, n):
            blocks[i] = _Recorder(originals[i], i, seen, template, last=i == n - 1)
        with torch.inference_mode():
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for i in range(1, n):
            blocks[i] = originals[i]
        pre.remove()
        post.remove()
    if len(seen) != n:
        log.warning("could not observe the arguments of every block (%d of %d); replaying block 0's", len(seen), n)
        return [{} for _ in range(n)]
    base = seen[0]
    return [{k: _to(v, offload) for k, v in seen[i].items() if k not in base or not _same(v, base[k])}
            for i in range(n)]


def capture_inputs(model: nn.Module, batches: list[Tensor], device: Optional[Device] = None,
                   offload: Device = "cpu") -> BlockInputs:
    """Run the model on each batch of token ids up to the first block; record its inputs.

    Keyword arguments (masks, position ids, rotary ``position_embeddings``, cache positions ...)
    are recorded per batch; a tensor equal to the first batch's is stored once and shared.
    Arguments that differ between blocks (per-layer sliding-window masks, local/global rotary
    embeddings) are recorded per block, once per distinct batch shape.
    """
    blocks_name, blocks = find_blocks(model)
    device = device or next(model.parameters()).device
    home = next(model.parameters()).device
    _move_outside_blocks(model, blocks_name, device)
    first = blocks[0]
    first.to(device)
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []
    per_shape: dict[tuple, list[dict[str, Any]]] = {}

    def hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        h, rest = _split_call(_mod, args, kw)
        if kwargs:
            rest = {k: (kwargs[0][k] if k in kwargs[0] and _same(v, kwargs[0][k]) else _to(v, offload))
                    for k, v in rest.items()}
        else:
            rest = _to(rest, offload)
        hidden.append(to_host(h.detach(), offload))
        kwargs.append(rest)
        raise _Captured

    try:
        for ids in batches:
            if tuple(ids.shape) not in per_shape:
                per_shape[tuple(ids.shape)] = _layer_overrides(model, blocks, ids, device, offload)
        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                for ids in batches:
                    try:
                        model(input_ids=ids.to(device), use_cache=False)
                    except _Captured:
                        pass
        finally:
            handle.remove()
    finally:
        first.to(home)
        _move_outside_blocks(model, blocks_name, home)
    if len(hidden) != len(batches):
        raise ModelError("the first decoder block was not reached during the forward pass")
    if any(any(o) for o in per_shape.values()):
        log.info("blocks receive different arguments (per-layer masks or rotary); replaying each block's own")
    return BlockInputs(hidden=hidden, kwargs=kwargs, layer_kwargs=[per_shape[tuple(ids.shape)] for ids in batches])


def to_host(t: Tensor, device: Device) -> Tensor:
    """``t`` on ``device``; a CUDA tensor bound for the CPU lands in pinned memory (its way back is asynchronous)."""
    device = torch.device(device)
    if device.type == "cpu" and t.is_cuda:
        pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return pinned.copy_(t)
    return t.to(device)


def run_batch(block: nn.Module, inputs: BlockInputs, b: int, device: Device, index: int = 0) -> Tensor:
    """Block ``index`` (already on ``device``) on calibration batch ``b``; its output hidden states, on ``device``."""
    h = inputs.hidden[b]
    with torch.inference_mode():
        out = block(h.to(device, non_blocking=h.is_pinned()), **_to(inputs.for_block(b, index), device))
    return out[0] if isinstance(out, (tuple, list)) else out


def run_block(block: nn.Module, inputs: BlockInputs, device: Device, offload: Device = "cpu",
              index: int = 0, in_place: bool = False, keep: bool = True) -> list[Tensor]:
    """Run ``block`` (already on ``device``, block number ``index``) on every captured batch; outputs on ``offload``.

    With ``in_place`` each batch's output replaces its input in ``inputs.hidden`` as soon as it is
    computed, so only one copy of the activations (and one batch) is alive at a time. Without
    ``keep`` the outputs are dropped (a pass run for its hooks).
    """
    outs = inputs.hidden if in_place else []
    for b in range(len(inputs.hidden)):
        out = run_batch(block, inputs, b, device, index)
        if not keep:
            continue
        out = to_host(out, offload)
        if in_place:
            outs[b] = out
        else:
            outs.append(out)
    return outs


def max_positions(config: Any) -> Optional[int]:
    """The model's maximum sequence length from its config, or None if it does not say."""
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` of ``root`` is; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
