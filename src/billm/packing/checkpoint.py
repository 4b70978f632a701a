"""The billm checkpoint: a Hugging Face-style folder whose quantized linears are truly bit-packed.

Layout of ``DIR``::

    config.json            as ``save_pretrained`` writes it, guarded: its ``model_type`` names billm (the
                           real one is under ``billm_model_type``) and its ``quantization_config`` lists
                           each packed layer's structure (see :mod:`billm.packing.hf`)
    generation_config.json, tokenizer files                  as ``save_pretrained`` writes them
    model.safetensors      every tensor of the model: non-quantized ones in the model's dtype under
                           their usual names, and for each quantized linear its packed fields
                           ``<layer>.packed_<field>`` (and ``<layer>.bias``) instead of its weight
    billm_quant.json       the quantization map: format_version, method and full config, each
                           quantized layer's format, shape, attributes, weight and storage bits,
                           tied-weight aliases, and a SHA-256 of every tensor
    billm_report.json      the quantization report (per-layer errors, timings, calibration), if given

Everything is read off the model: its :class:`PackedLinear` layers and the method's config that
:func:`billm.quantize` recorded in ``model.config.quantization_config``. The map is written last
and the folder appears under its name in one rename, so a folder with a map is complete;
:func:`load` refuses any other. Load the folder with :func:`billm.load`, any ``billm`` command, or,
after ``import billm``, ``transformers.AutoModelForCausalLM.from_pretrained`` (plain transformers
refuses it with an error naming billm).

Format versions: 1 recorded a formula's storage bits (``storage_bits_rule``); 2 records the
storage bits measured from the packed bytes (``storage_bits``) and the method config in
``config.json``; 3 guards ``config.json`` and lists the layers there (for transformers). All read the
same way with :func:`load`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from ..io import atomic_dir, check_output_dir, write_json_atomic
from .formats import FORMATS, StoredWeight, get_format, layer_fields, storage_bits
from .guard import QUANT_METHOD, guard_config_file
from .linear import PREFIX, PackedLinear

log = logging.getLogger(__name__)

FORMAT_VERSION = 3
QUANT_MAP = "billm_quant.json"
WEIGHTS = "model.safetensors"
REPORT = "billm_report.json"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn}


def is_checkpoint(path: Union[str, Path]) -> bool:
    """True if ``path`` is a complete billm checkpoint folder (it has a quantization map)."""
    return (Path(path) / QUANT_MAP).is_file()


def is_billm_folder(path: Path) -> bool:
    """A folder billm wrote (a checkpoint, or an older report-only output): safe to replace."""
    return is_checkpoint(path) or (path / REPORT).is_file()


def _tensor_bytes(t: Tensor):
    """(nbytes,) uint8 numpy view of a tensor's bytes in C order (no copy where it is contiguous on the CPU)."""
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


def tensor_sha256(t: Tensor) -> str:
    """SHA-256 of a tensor's bytes (C order)."""
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()  # the array's own buffer, not a copy of it


# ----------------------------------------------------------------------------- save

def _file_order(specs: dict[str, torch.dtype]) -> list[str]:
    """The order in which safetensors lays out tensors of these names and dtypes, asked of safetensors itself (an
    empty tensor of each dtype is enough: it orders by dtype, then name)."""
    from safetensors.torch import save

    probe = save({name: torch.empty((0,), dtype=dt) for name, dt in specs.items()})
    n = struct.unpack("<Q", probe[:8])[0]
    return [k for k in json.loads(probe[8:8 + n]) if k != "__metadata__"]


def write_safetensors(path: Union[str, Path], specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                      read: Callable[[str], Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """Write a safetensors file one tensor at a time: the bytes ``safetensors.torch.save_file`` writes for the same
    tensors, with only one of them in memory at once.

    Args:
        specs: name -> (dtype, shape) of every tensor in the file.
        read: name -> the tensor (asked once per name, in file order; let go once written).
        metadata: the header's ``__metadata__``.

    Returns:
        name -> SHA-256 of the tensor's bytes.

    Raises:
        CheckpointError: ``read`` gave a tensor of another dtype or shape, or a dtype safetensors has no name for.
    """
    names = {v: k for k, v in _DTYPES.items()}
    bad = sorted({str(dt) for dt, _ in specs.values() if dt not in names})
    if bad:
        raise CheckpointError(f"no safetensors name for the dtype(s) {bad}")
    order = _file_order({n: dt for n, (dt, _) in specs.items()})
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name in order:
        dt, shape = specs[name]
        end = offset + math.prod(shape) * dt.itemsize
        header[name] = {"dtype": names[dt], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, the header padded with spaces
    sums: dict[str, str] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name in order:
            t = read(name).detach()
            if t.dtype != specs[name][0] or tuple(t.shape) != tuple(specs[name][1]):
                raise CheckpointError(f"{name}: expected {specs[name][0]} {tuple(specs[name][1])}, "
                                      f"got {t.dtype} {tuple(t.shape)}")
            data = _tensor_bytes(t)
            sums[name] = hashlib.sha256(data).hexdigest()
            f.write(data.data)
            del t, data
    return sums


def _state_without_ties(sd: dict[str, Tensor], owners: dict[str, int]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied embeddings); return (unique tensors, alias -> source).

    ``owners``: name -> identity of the parameter object behind it, which tells the ties of tensors on ``meta``
    (no storage to compare) apart.
    """
    seen: dict[tuple, str] = {}
    out: dict[str, Tensor] = {}
    tied: dict[str, str] = {}
    for name, t in sd.items():
        if t.is_meta:
            key = ("meta", owners.get(name, name), tuple(t.shape), t.dtype)
        else:
            key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                   t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        out[name] = t
    return out, tied


def packed_layers(model: nn.Module) -> dict[str, PackedLinear]:
    """The model's packed linears by qualified name, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def quantization_record(method: str, config: dict[str, Any], layers: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The ``quantization_config`` billm keeps on a quantized model and in its ``config.json``.

    In ``config.json`` it also lists each packed layer's structure (``layers``: what transformers
    needs to build the empty :class:`PackedLinear` layers before the weights load).
    """
    record = {"quant_method": QUANT_METHOD, "method": method, "format_version": FORMAT_VERSION, "config": config}
    return {**record, "layers": layers} if layers is not None else record


def quantization_config(model: nn.Module) -> dict[str, Any]:
    """The billm ``quantization_config`` that :func:`billm.quantize` (or :func:`load`) left on the model.

    Raises:
        CheckpointError: the model was not quantized by billm.
    """
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if hasattr(qc, "to_dict"):  # loaded by transformers: its quantization config object
        qc = qc.to_dict()
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD or "config" not in qc:
        raise CheckpointError("the model carries no billm quantization config (quantize it with billm.quantize, or "
                              "load it with billm.load)")
    return qc


def _structure(layer: PackedLinear) -> dict[str, Any]:
    """What it takes to build the layer empty: format, shape, attributes, bias, the module it replaced."""
    return {"format": layer.format, "shape": list(layer.shape), "meta": layer.meta, "bias": layer.bias is not None,
            "module": layer.source}


def _layer_entry(layer: PackedLinear, st: StoredWeight) -> dict[str, Any]:
    return {**_structure(layer), "weight_bits": st.weight_bits, "storage_bits": st.storage_bits}


def _weighted(layers: dict[str, dict[str, Any]], key: str) -> float:
    n = sum(e["shape"][0] * e["shape"][1] for e in layers.values())
    return sum(e[key] * e["shape"][0] * e["shape"][1] for e in layers.values()) / n


# How the tokenizer happened to be loaded (offline or not), which transformers records in tokenizer_config.json:
# left out, so one command makes the same bytes everywhere and the folder loads anywhere.
_LOADING_KWARGS = ("local_files_only",)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``tokenizer.save_pretrained(folder)`` without the loading options of this session (:data:`_LOADING_KWARGS`)."""
    kept = {k: tokenizer.init_kwargs.pop(k) for k in _LOADING_KWARGS if k in tokenizer.init_kwargs}
    try:
        tokenizer.save_pretrained(folder)
    finally:
        tokenizer.init_kwargs.update(kept)


def save(model: nn.Module, out: Union[str, Path], tokenizer=None, *, report=None, extra: Optional[dict[str, Any]] = None,
         dtype: Optional[torch.dtype] = None, source_model: Optional[str] = None,
         calibration: Optional[dict[str, Any]] = None, source: Optional[Callable[[str], Tensor]] = None) -> Path:
    """Write the bit-packed checkpoint of a model quantized by :func:`billm.quantize` (or loaded by :func:`load`).

    Args:
        model: the quantized model; its :class:`PackedLinear` layers are written as they are.
        out: the output folder (replaced atomically; an existing non-billm folder is refused).
        tokenizer: saved alongside when given.
        report: the run's :class:`~billm.QuantReport`, written to ``billm_report.json`` (optional).
        extra: more JSON for ``billm_report.json`` (calibration, evaluation, ...).
        dtype: dtype of the non-quantized floating tensors in the file (default: as in the model).
        source_model: what the model was loaded from (recorded in the map; default: its config's name).
        calibration: the calibration data's description (source, nsamples, seqlen, seed), recorded in the map.
        source: where the tensors the model holds empty (on ``meta``) are read, by their name in the file (a packed
            field ``<layer>.packed_<field>`` or a plain tensor): what :func:`billm.quantize` left in its progress
            store and the source folder when told not to read them back (``read_back=False``). The file is written
            one tensor at a time either way, so such a model is saved holding one tensor at a time.

    Returns:
        The folder written.
    """
    import billm

    packed = packed_layers(model)
    if not packed:
        raise CheckpointError("the model holds no packed layers (was it quantized by billm.quantize?)")
    qc = quantization_config(model)
    out = check_output_dir(Path(out), is_billm_folder, "billm checkpoint")
    stored = {n: m.stored() for n, m in packed.items()}
    packed_names = {f"{n}.{PREFIX}{f}" for n, st in stored.items() for f in st.tensors}
    sd = {k: v for k, v in model.state_dict().items() if k not in packed_names}
    owners = {n: id(p) for n, p in model.named_parameters(remove_duplicate=False)}
    tensors, tied = _state_without_ties(sd, owners)
    model_dtype = str(dtype or next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32))
    layers = {n: _layer_entry(packed[n], st) for n, st in stored.items()}
    for n, st in stored.items():  # fields in a fixed order: the map's bytes do not depend on how the model was built
        tensors.update({f"{n}.{PREFIX}{f}": st.tensors[f] for f in sorted(st.tensors)})
    cast = lambda k: dtype if dtype is not None and k not in packed_names and tensors[k].is_floating_point() \
        else tensors[k].dtype  # noqa: E731
    missing = [k for k, t in tensors.items() if t.is_meta] if source is None else []
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) of the model are empty (on meta), e.g. {missing[:3]}, and no "
                              "source was given to read them from")

    def read(k: str) -> Tensor:  # one tensor as the file stores it
        t = source(k) if tensors[k].is_meta else tensors[k]
        return t.detach().cpu().to(cast(k))

    qmap = {
        "format_version": FORMAT_VERSION,
        "billm_version": billm.__version__, "torch_version": torch.__version__,
        "transformers_version": __import__("transformers").__version__,
        "source_model": source_model or getattr(getattr(model, "config", None), "_name_or_path", None),
        "calibration": calibration,
        "method": qc["method"], "config": qc["config"],
        "dtype": model_dtype.replace("torch.", ""),
        "weight_bits": _weighted(layers, "weight_bits"), "storage_bits": _weighted(layers, "storage_bits"),
        "layers": layers, "tied": tied,
        "files": {WEIGHTS: {"sha256": {}}},
    }
    with atomic_dir(out) as tmp:
        config = copy.deepcopy(model.config)
        config.quantization_config = quantization_record(qc["method"], qc["config"],
                                                         {n: _structure(m) for n, m in packed.items()})
        config.dtype = model_dtype.replace("torch.", "")  # what from_pretrained(dtype="auto") should build
        config.save_pretrained(tmp)
        guard_config_file(tmp / "config.json")  # plain transformers refuses the folder, naming billm
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            try:
                gen.save_pretrained(tmp)
            except ValueError as e:  # an invalid generation config should not cost the checkpoint
                log.warning("generation config not saved: %s", e)
        if tokenizer is not None:
            save_tokenizer(tokenizer, tmp)
        # one metadata key only: safetensors writes its metadata map in hash order, so several keys would make
        # the header (and the file's bytes) differ from run to run
        sums = write_safetensors(tmp / WEIGHTS, {k: (cast(k), tuple(t.shape)) for k, t in tensors.items()}, read,
                                 {"format": "pt"})
        qmap["files"][WEIGHTS]["sha256"] = {k: sums[k] for k in tensors}  # the map lists them in the model's order
        qmap["files"][WEIGHTS]["bytes"] = (tmp / WEIGHTS).stat().st_size
        if report is not None or extra:
            write_json_atomic(tmp / REPORT, {**(extra or {}), **({"quantization": report.to_dict()} if report else {})})
        write_json_atomic(tmp / QUANT_MAP, qmap)  # last: its presence marks a complete folder
    log.info("saved %d packed layers to %s (%.1f MB)", len(layers), out, qmap["files"][WEIGHTS]["bytes"] / 1e6)
    return out


# ----------------------------------------------------------------------------- reading

def read_map(path: Union[str, Path]) -> dict[str, Any]:
    """The quantization map of a checkpoint folder, validated for presence and format version."""
    path = Path(path)
    f = path / QUANT_MAP
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not f.is_file():
        raise CheckpointError(f"{path}: not a complete billm checkpoint ({QUANT_MAP} is missing; an interrupted "
                              f"save never leaves one); quantize again with `billm quantize ... --out {path}`, or, "
                              "for a folder written by save_pretrained, load it with transformers after `import billm` "
                              "(AutoModelForCausalLM.from_pretrained)")
    try:
        qmap = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: corrupt quantization map ({e})") from None
    if not isinstance(qmap, dict) or "format_version" not in qmap:
        raise CheckpointError(f"{f}: not a billm quantization map (no format_version)")
    v = qmap["format_version"]
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise CheckpointError(f"{f}: format_version {v!r} is newer than this billm reads ({FORMAT_VERSION}); "
                              "upgrade billm (pip install -U billm)")
    for key in ("layers", "tied", "files", "config"):
        if key not in qmap:
            raise CheckpointError(f"{f}: the quantization map lacks {key!r}")
    for name, layer in qmap["layers"].items():
        if layer.get("format") not in FORMATS:
            raise CheckpointError(f"{f}: layer {name} has unknown format {layer.get('format')!r}")
        try:
            layer_fields(layer["format"], tuple(layer["shape"]), layer["meta"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{f}: layer {name} has invalid attributes ({type(e).__name__}: {e})") from None
    return qmap


@dataclass
class TensorEntry:
    """One tensor in a safetensors header."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(file: Union[str, Path]) -> dict[str, TensorEntry]:
    """Parse a safetensors header (8-byte little-endian length, then JSON) and check the file is whole.

    Raises:
        CheckpointError: missing, truncated or corrupt file, naming it.
    """
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    size = file.stat().st_size
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes; not even a safetensors header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: truncated or corrupt (header of {n} bytes in a {size}-byte file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    entries: dict[str, TensorEntry] = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = e["data_offsets"]
            entries[name] = TensorEntry(e["dtype"], tuple(e["shape"]), 8 + n + a, 8 + n + b)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from None
    end = max((t.end for t in entries.values()), default=8 + n)
    if end > size:
        last = max(entries, key=lambda k: entries[k].end)
        raise CheckpointError(f"{file}: truncated: {size} bytes, but tensor {last!r} ends at byte {end}")
    return entries


# ----------------------------------------------------------------------------- load

def swap_in_packed(model: nn.Module, layers: dict[str, dict[str, Any]], where: str) -> None:
    """Replace each listed linear of an empty (meta) model by an empty :class:`PackedLinear` of its format.

    ``layers`` maps qualified names to ``format``, ``shape``, ``meta``, ``bias`` and ``module`` (the
    class replaced); ``where`` names the file they came from, for errors. The bias takes the old weight's dtype.

    Raises:
        CheckpointError: a layer the model lacks, or of another shape.
    """
    for name, layer in layers.items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
        except AttributeError:
            raise CheckpointError(f"{where}: layer {name} does not exist in a {type(model).__name__}") from None
        shape = tuple(layer["shape"])
        w = getattr(old, "weight", None)
        have = None if w is None else (tuple(w.shape[::-1]) if type(old).__name__ == "Conv1D" else tuple(w.shape))
        if have != shape:
            raise CheckpointError(f"{where}: layer {name} is {shape} there but {have} in the model config")
        setattr(parent, child, PackedLinear(layer["format"], shape, layer["meta"], bias=layer["bias"],
                                            dtype=w.dtype, device="meta", source=layer.get("module", "Linear")))


def _skeleton(path: Path, qmap: dict[str, Any], dtype: Optional[torch.dtype]) -> nn.Module:
    """The model built from config.json without allocating weights, quantized linears swapped for PackedLinear."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers raises OSError / ValueError for a bad config.json
        raise CheckpointError(f"{path / 'config.json'}: cannot read the model config ({e})") from e
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights(include_buffers=False):  # parameters on "meta"; computed buffers (rotary) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(torch, qmap.get("dtype", "float32")))
    swap_in_packed(model, qmap["layers"], where=str(path / QUANT_MAP))
    return model


def _expected_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor the file must provide: the skeleton's persistent state (on meta)."""
    return dict(model.state_dict(keep_vars=True))


def load(path: Union[str, Path], device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = None,
         verify: bool = True) -> nn.Module:
    """Load a billm checkpoint: quantized linears stay packed (:class:`PackedLinear`), the rest is loaded as saved.

    Args:
        path: the checkpoint folder.
        device: where the model goes (``cpu``, ``cuda``, ...).
        dtype: convert the non-quantized floating tensors to this dtype (default: as saved).
        verify: check every tensor's SHA-256 against the quantization map.

    Returns:
        The model in eval mode.

    Raises:
        CheckpointError: incomplete, truncated or corrupt folder, a newer format version, a tensor
            missing or of the wrong shape/dtype, or a checksum mismatch; the message names the
            file and the tensor.
    """
    path = Path(path).expanduser()
    qmap = read_map(path)
    file = path / WEIGHTS
    header = read_header(file)
    model = _skeleton(path, qmap, dtype)
    expected = _expected_tensors(model)
    tied = qmap["tied"]
    for name, t in expected.items():
        if name in tied:
            continue
        if name not in header:
            raise CheckpointError(f"{file}: tensor {name!r} is missing")
        e = header[name]
        if e.shape != tuple(t.shape):
            raise CheckpointError(f"{file}: tensor {name!r} has shape {list(e.shape)}, expected {list(t.shape)}")
        is_packed = f".{PREFIX}" in name
        if is_packed and _DTYPES.get(e.dtype) != t.dtype:
            raise CheckpointError(f"{file}: tensor {name!r} is {e.dtype}, the format needs {t.dtype}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor(s) {extra[:5]} (not in this model)")
    sd = _read_tensors(file, qmap["files"].get(WEIGHTS, {}).get("sha256", {}) if verify else None, device, dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if m not in tied]
    if missing or unexpected:
        raise CheckpointError(f"{file}: missing {missing[:5]} / unexpected {unexpected[:5]} tensors")
    for alias, source in tied.items():
        _tie(model, alias, source)
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        raise CheckpointError(f"{file}: no data for {still_meta[:5]}")
    model.to(device)
    model.eval()
    model.config.quantization_config = quantization_record(qmap["method"], qmap["config"])
    return model


def _read_tensors(file: Path, sums: Optional[dict[str, str]], device: Union[str, torch.device],
                  dtype: Optional[torch.dtype]) -> dict[str, Tensor]:
    """Every tensor of ``file``, read one at a time, checked against ``sums`` (SHA-256; None: unchecked),
    cast to ``dtype`` (non-packed floating ones) and moved to ``device`` before the next is read."""
    from safetensors import SafetensorError, safe_open

    sd: dict[str, Tensor] = {}
    try:
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if sums is not None:
                    if name not in sums:
                        raise CheckpointError(f"{file.parent / QUANT_MAP}: no checksum for tensor {name!r}")
                    if tensor_sha256(t) != sums[name]:
                        raise CheckpointError(f"{file}: tensor {name!r} is corrupt (SHA-256 differs from the "
                                              "quantization map)")
                if dtype is not None and t.is_floating_point() and f".{PREFIX}" not in name:
                    t = t.to(dtype)
                sd[name] = t.to(device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from e
    return sd


def _tie(model: nn.Module, alias: str, source: str) -> None:
    """Make the parameter named ``alias`` the very same tensor as ``source`` (tied embeddings)."""
    src_mod, _, src_attr = source.rpartition(".")
    dst_mod, _, dst_attr = alias.rpartition(".")
    src = getattr(model.get_submodule(src_mod), src_attr)
    setattr(model.get_submodule(dst_mod), dst_attr, src)


# ----------------------------------------------------------------------------- inspect

@dataclass
class LayerBytes:
    """Where one quantized layer's bytes go."""

    name: str
    shape: tuple[int, int]
    format: str
    meta: dict[str, Any]
    weight_bits: Optional[float]
    tensor_bytes: dict[str, int] = field(default_factory=dict)  # packed tensors' bytes, by what they pay for

    @property
    def map_bytes(self) -> int:
        """Side information the layer keeps in the JSON map."""
        return get_format(self.format).map_bytes(self.meta)

    @property
    def bytes_by_kind(self) -> dict[str, int]:
        return {**self.tensor_bytes, **({"in the map": self.map_bytes} if self.map_bytes else {})}

    @property
    def nbytes(self) -> int:
        return sum(self.bytes_by_kind.values())

    @property
    def storage_bits(self) -> float:
        """Bits per weight measured from the file (packed fields and map share, bias excluded)."""
        return storage_bits(self.format, self.shape, self.meta, sum(self.tensor_bytes.values()))


@dataclass
class CheckpointInfo:
    """What :func:`inspect` measures from a checkpoint's files."""

    path: Path
    qmap: dict[str, Any]
    layers: list[LayerBytes]
    file_bytes: int
    other_bytes: int  # non-quantized tensors (embeddings, norms, biases, lm_head)
    n_params: int  # parameters of the original model (quantized weights + everything else, ties once)
    header_bytes: int

    @property
    def n_quantized(self) -> int:
        return sum(l.shape[0] * l.shape[1] for l in self.layers)

    @property
    def storage_bits(self) -> float:
        """Packed bytes x 8 / quantized weights, over all quantized layers."""
        return sum(l.nbytes for l in self.layers) * 8 / max(1, self.n_quantized)

    @property
    def weight_bits(self) -> float:
        return sum((l.weight_bits or 0) * l.shape[0] * l.shape[1] for l in self.layers) / max(1, self.n_quantized)

    @property
    def fp16_bytes(self) -> int:
        """The same model in fp16: 2 bytes a parameter."""
        return 2 * self.n_params

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for l in self.layers:
            for k, v in l.bytes_by_kind.items():
                out[k] = out.get(k, 0) + v
        return out

    def to_dict(self) -> dict[str, Any]:
        """The measurements as JSON (what ``billm inspect --json`` writes)."""
        return {"path": str(self.path), "weight_bits": self.weight_bits, "storage_bits": self.storage_bits,
                "file_bytes": self.file_bytes, "fp16_bytes": self.fp16_bytes, "other_bytes": self.other_bytes,
                "n_params": self.n_params, "n_quantized": self.n_quantized, "bytes_by_kind": self.bytes_by_kind(),
                "layers": [{"name": l.name, "shape": list(l.shape), "format": l.format, "weight_bits": l.weight_bits,
                            "storage_bits": l.storage_bits, "bytes_by_kind": l.bytes_by_kind} for l in self.layers]}


def inspect(path: Union[str, Path]) -> CheckpointInfo:
    """Measure a checkpoint from its files alone (no tensor is loaded)."""
    path = Path(path).expanduser()
    qmap = read_map(path)
    file = path / WEIGHTS
    header = read_header(file)
    layers: list[LayerBytes] = []
    packed_names: set[str] = set()
    for name, layer in qmap["layers"].items():
        shape = tuple(layer["shape"])
        fields = layer_fields(layer["format"], shape, layer["meta"])
        lb = LayerBytes(name, shape, layer["format"], layer["meta"], layer.get("weight_bits"))
        for fname, spec in fields.items():
            key = f"{name}.{PREFIX}{fname}"
            if key not in header:
                raise CheckpointError(f"{file}: tensor {key!r} is missing")
            lb.tensor_bytes[spec.kind] = lb.tensor_bytes.get(spec.kind, 0) + header[key].nbytes
            packed_names.add(key)
        layers.append(lb)
    other = {k: e for k, e in header.items() if k not in packed_names}
    other_params = sum(int(torch.Size(e.shape).numel()) for e in other.values())
    n_params = other_params + sum(l.shape[0] * l.shape[1] for l in layers)
    header_bytes = min((e.start for e in header.values()), default=file.stat().st_size)
    return CheckpointInfo(path=path, qmap=qmap, layers=layers, file_bytes=file.stat().st_size,
                          other_bytes=sum(e.nbytes for e in other.values()), n_params=n_params,
                          header_bytes=header_bytes)
