"""Generic model plumbing: find the decoder blocks and their linears, capture the first block's
inputs (with every keyword argument), and walk the blocks one at a time.

Nothing here matches on model names: blocks are the ``nn.ModuleList`` whose children are the
model's repeated block class (``_no_split_modules``), falling back to the longest ModuleList of
identical modules; linears are ``nn.Linear`` and GPT-2's ``Conv1D`` (a transposed linear).
"""

from __future__ import annotations

import fnmatch
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import ModelError

log = logging.getLogger(__name__)

try:  # GPT-2 style models use a transposed linear
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()  # type: ignore[assignment,misc]

Device = Union[str, torch.device]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-block list of a model: (qualified name, ModuleList).

    Raises:
        ModelError: no repeated block list was found.
    """
    wanted = set(getattr(model, "_no_split_modules", None) or [])
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
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
    """The weight as (out_features, in_features), a view for nn.Linear (Conv1D is stored transposed)."""
    return m.weight.data if isinstance(m, nn.Linear) else m.weight.data.t()


def set_weight(m: nn.Module, w: Tensor) -> None:
    """Write (out_features, in_features) values back in the module's own layout and dtype."""
    target = m.weight.data
    target.copy_((w if isinstance(m, nn.Linear) else w.t()).to(target.dtype))


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
    """Move every parameter and buffer that is not inside the block list (embeddings, norms, rotary)."""
    prefix = blocks_name + "."
    for name, mod in model.named_modules():
        if name == blocks_name or name.startswith(prefix):
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            p.data = p.data.to(device)
        for bname, b in list(mod.named_buffers(recurse=False)):
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


def capture_inputs(model: nn.Module, batches: list[Tensor], device: Optional[Device] = None,
                   offload: Device = "cpu") -> BlockInputs:
    """Run the model on each batch of token ids up to the first block; record its inputs.

    Keyword arguments (masks, position ids, rotary ``position_embeddings``, cache positions ...)
    are recorded per batch; a tensor equal to the first batch's is stored once and shared.
    """
    blocks_name, blocks = find_blocks(model)
    device = device or next(model.parameters()).device
    home = next(model.parameters()).device
    _move_outside_blocks(model, blocks_name, device)
    first = blocks[0]
    first.to(device)
    hidden: list[Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def hook(_mod: nn.Module, args: tuple, kw: dict) -> None:
        h, rest = _split_call(_mod, args, kw)
        if kwargs:
            rest = {k: (kwargs[0][k] if k in kwargs[0] and _same(v, kwargs[0][k]) else _to(v, offload))
                    for k, v in rest.items()}
        else:
            rest = _to(rest, offload)
        hidden.append(h.detach().to(offload))
        kwargs.append(rest)
        raise _Captured

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
        first.to(home)
        _move_outside_blocks(model, blocks_name, home)
    if len(hidden) != len(batches):
        raise ModelError("the first decoder block was not reached during the forward pass")
    return BlockInputs(hidden=hidden, kwargs=kwargs)


def run_block(block: nn.Module, inputs: BlockInputs, device: Device, offload: Device = "cpu") -> list[Tensor]:
    """Run ``block`` (already on ``device``) on every captured batch; outputs on ``offload``."""
    outs = []
    with torch.inference_mode():
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            out = block(h.to(device), **_to(kw, device))
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(out.to(offload))
    return outs


def iter_blocks(model: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
    """(index, qualified name, block) for each decoder block."""
    name, blocks = find_blocks(model)
    for i, b in enumerate(blocks):
        yield i, f"{name}.{i}", b
