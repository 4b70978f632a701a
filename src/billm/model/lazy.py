"""Models bigger than memory: an empty (meta) model whose tensors are read one module at a time.

:func:`load_skeleton` builds a causal LM from a folder's ``config.json`` with every parameter on
the ``meta`` device (nothing allocated) and returns a :class:`LazyWeights` that reads each tensor
from the folder's safetensors shards, memory-mapped, when asked. :func:`billm.quantize` given
``weights=`` materializes the embeddings for the capture and then one decoder block at a time:
its float linears are dropped as soon as their packed forms exist, so peak memory is about the
embeddings, one block, the calibration activations and the packed blocks so far.

:meth:`LazyWeights.from_accelerate` turns a model loaded with accelerate's ``device_map`` (disk or
CPU offload) into the same thing: the offloaded tensors are read through accelerate's own
weights maps, and its hooks are removed so billm moves blocks itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class LazyWeights:
    """Where each tensor of an empty model comes from: name -> a function that reads it.

    Args:
        loaders: qualified tensor name (as in ``model.state_dict()``) -> a zero-argument reader.
        source: what the tensors are read from, for messages.
    """

    def __init__(self, loaders: dict[str, Callable[[], Tensor]], source: str) -> None:
        self.loaders, self.source = loaders, source

    @classmethod
    def from_folder(cls, folder: Union[str, Path]) -> "LazyWeights":
        """The tensors of a Hugging Face folder's safetensors file(s), read memory-mapped on demand.

        Raises:
            ModelError: the folder has no safetensors weights, or its index names a missing shard.
        """
        from safetensors import safe_open

        folder = Path(folder)
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        elif (folder / SINGLE).is_file():
            with safe_open(folder / SINGLE, "pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise ModelError(f"{folder}: no {SINGLE} or {INDEX}; block-by-block loading reads safetensors weights only")

        def reader(key: str, file: str) -> Callable[[], Tensor]:
            def read() -> Tensor:
                if not (folder / file).is_file():
                    raise ModelError(f"{folder / INDEX} names {file}, which is missing")
                # opened per read: a mapping kept open would count every page read so far in the resident memory
                with safe_open(folder / file, "pt") as f:
                    return f.get_tensor(key)
            return read

        return cls({k: reader(k, f) for k, f in weight_map.items()}, str(folder))

    @classmethod
    def from_accelerate(cls, model: nn.Module) -> Optional["LazyWeights"]:
        """The offloaded tensors of a model dispatched by accelerate (``device_map``), read through its hooks.

        Removes accelerate's hooks (billm moves each block itself). Returns None for a model
        accelerate did not dispatch.
        """
        from accelerate.hooks import remove_hook_from_module

        hooked = [(n, m) for n, m in model.named_modules() if getattr(m, "_hf_hook", None) is not None]
        if not hooked:
            return None
        loaders: dict[str, Callable[[], Tensor]] = {}
        for name, mod in hooked:
            wmap = getattr(mod._hf_hook, "weights_map", None)
            if not getattr(mod._hf_hook, "offload", False) or wmap is None:
                continue
            recurse = bool(getattr(mod._hf_hook, "place_submodules", False))
            tensors = list(mod.named_parameters(recurse=recurse)) + list(mod.named_buffers(recurse=recurse))
            for pname, t in tensors:
                if t.is_meta:
                    loaders[f"{name}.{pname}" if name else pname] = (lambda w=wmap, k=pname: w[k])
        remove_hook_from_module(model, recurse=True)
        if hasattr(model, "hf_device_map"):
            del model.hf_device_map
        return cls(loaders, "accelerate's offload")

    def read(self, name: str) -> Tensor:
        """The tensor ``name``.

        Raises:
            ModelError: it is not in the source.
        """
        if name not in self.loaders:
            raise ModelError(f"{self.source}: no tensor {name!r} (needed to fill the empty model)")
        return self.loaders[name]()

    def materialize(self, module: nn.Module, prefix: str = "", skip: Callable[[str], bool] = lambda name: False,
                    strict: bool = True) -> list[str]:
        """Read every ``meta`` parameter and buffer of ``module`` (named ``prefix`` in the model) onto the CPU,
        in the empty tensor's dtype.

        Args:
            skip: qualified submodule names to leave empty.
            strict: a tensor missing from the source is an error (else it stays on ``meta``).

        Returns:
            The qualified names of the tensors read.
        """
        done = []
        for sub_name, sub in module.named_modules():
            full = ".".join(x for x in (prefix, sub_name) if x)
            if skip(full):
                continue
            slots = [(sub._parameters, k, v) for k, v in sub._parameters.items()] + \
                    [(sub._buffers, k, v) for k, v in sub._buffers.items()]
            for slot, key, old in slots:
                name = f"{full}.{key}" if full else key
                if old is None or not old.is_meta or (not strict and name not in self.loaders):
                    continue
                t = self.read(name)
                if tuple(t.shape) != tuple(old.shape):
                    raise ModelError(f"{self.source}: {name} is {tuple(t.shape)}, the model expects {tuple(old.shape)}")
                t = (t.to(old.dtype) if t.is_floating_point() else t).contiguous()
                slot[key] = nn.Parameter(t, requires_grad=False) if slot is sub._parameters else t
                done.append(name)
        return done

    @staticmethod
    def release(module: nn.Module, names: Sequence[str]) -> None:
        """Empty the tensors ``names`` (qualified in ``module``) again: each back on ``meta``, same shape and dtype,
        its memory freed once nothing else holds it (:meth:`materialize` reads it anew)."""
        for name in names:
            owner, _, key = name.rpartition(".")
            sub = module.get_submodule(owner)
            slot = sub._parameters if key in sub._parameters else sub._buffers
            old = slot[key]
            empty = torch.empty_like(old, device="meta")
            slot[key] = nn.Parameter(empty, requires_grad=False) if slot is sub._parameters else empty


def is_lazy(model: nn.Module) -> bool:
    """True if some parameter of ``model`` is on the ``meta`` device (an empty skeleton, or accelerate's offload)."""
    return any(p.is_meta for p in model.parameters())


def load_skeleton(folder: Union[str, Path], dtype: Optional[torch.dtype] = None) -> tuple[nn.Module, LazyWeights]:
    """An empty causal LM built from ``folder/config.json`` (parameters on ``meta``) and its :class:`LazyWeights`.

    Args:
        folder: a Hugging Face model folder with safetensors weights.
        dtype: the model's dtype (default: the config's ``dtype``, else float32).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = LazyWeights.from_folder(folder)
    config = AutoConfig.from_pretrained(folder)
    dtype = dtype or config_dtype(config)
    with init_empty_weights(include_buffers=False):  # rotary and other computed buffers stay real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model, weights


def config_dtype(config) -> torch.dtype:
    """The dtype a checkpoint says it was saved in (``dtype`` / ``torch_dtype``), float32 if it does not say."""
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = getattr(torch, d, None)
    return d if isinstance(d, torch.dtype) and d.is_floating_point else torch.float32


def fill_outside_blocks(model: nn.Module, blocks_name: str, weights: LazyWeights, head: bool = True) -> list[str]:
    """Materialize everything that is not a decoder block (embeddings, final norm, lm_head), and re-tie.

    Args:
        head: also the output head (``get_output_embeddings()``) when it is not tied to the input embeddings;
            without it, what runs before the first block (the capture) has what it needs.

    Returns:
        The qualified names of the tensors read (what :meth:`LazyWeights.release` may empty again).

    Raises:
        ModelError: a tensor outside the blocks is neither in the source nor tied to one that is.
    """
    prefix = blocks_name + "."
    inside = lambda name: name == blocks_name or name.startswith(prefix)  # noqa: E731
    out = model.get_output_embeddings() if not head and hasattr(model, "get_output_embeddings") else None
    head_name = next((n for n, m in model.named_modules() if m is out), None) if out is not None else None
    skip = inside if head_name is None else (lambda name: inside(name) or name == head_name)
    read = weights.materialize(model, skip=skip, strict=False)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # a tied lm_head is not in the file
    left = [n for n, p in model.named_parameters() if p.is_meta and not skip(n.rpartition(".")[0])]
    if left:
        raise ModelError(f"{weights.source}: no data for {left[:5]}")
    return read
