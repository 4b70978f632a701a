"""Typed, versioned, serialisable quantization configs: the one place a method's options live.

Every method has a frozen dataclass config, defined in its own module beside its quantizer and
stored format (:mod:`billm.methods`); this module holds the base class they share. Its fields are the method's options: the CLI flags
(``billm quantize --max-salient-cols 20``), the ``billm compare`` specs (``billm:plus+b256``) and
the checkpoint's record (:meth:`QuantConfig.to_dict`) are all derived from them, with the help text
in each field's metadata (:func:`option`). ``presets`` names whole option sets and ``abbrev`` the
short spellings a compare spec may use. A config class becomes usable once a quantizer is
registered for it (:func:`billm.register_method`).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Union

import torch

from .errors import BillmError

SCALE_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32,
                                         "float8_e4m3fn": torch.float8_e4m3fn}
"""The dtypes scales and means may be stored (and rounded) in, by their config name."""


def option(default: Any, help: str, choices: tuple[str, ...] = (), record_default: bool = True) -> Any:
    """A config field with its help text (and, for a string field, its allowed values).

    ``record_default=False``: :meth:`QuantConfig.to_dict` leaves the field out while it holds its
    default, so the records (and checkpoints) of configs that do not use an option added later stay
    byte-identical to those written before it existed.
    """
    return dataclasses.field(default=default, metadata={"help": help, "choices": tuple(choices),
                                                        "record_default": record_default})


class SalientMetric(str, enum.Enum):
    """How salience of a weight is measured."""

    HESSIAN = "hessian"  # s_ij = w_ij^2 / U_jj^2  (U = chol(H^-1), upper)
    MAGNITUDE = "magnitude"  # s_ij = |w_ij|


class SearchDomain(str, enum.Enum):
    """Which matrix the two searches (salient columns, break point) score their error on."""

    WEIGHT = "weight"  # the paper: error of the binarized weights
    SALIENCE = "salience"  # the public reference code: error of the binarized salience matrix
    OUTPUT = "output"  # what OBC minimises: the block's output error under H, later columns compensated


class BreakGrid(str, enum.Enum):
    """Candidate break points for the non-salient split."""

    QUANTILE = "quantile"  # quantiles 10 %..90 % of |M| (reference code: 81 of them)
    LINEAR = "linear"  # p = i * max|M|, i in 0.1..0.9 (paper: 9 of them)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise BillmError(f"invalid config: {msg}")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(cls: type, name: str, value: Any) -> Any:
    """``value`` as field ``name`` of ``cls`` holds it: enums from their value, tuples from lists."""
    kind = _field_types(cls)[name]
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        try:
            return kind(value)
        except ValueError:
            raise BillmError(f"invalid config: {name}={value!r}; choose one of: "
                             f"{', '.join(e.value for e in kind)}") from None
    if typing.get_origin(kind) is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


@dataclass(frozen=True)
class QuantConfig:
    """Options shared by every method (see each field's help).

    Embeddings and ``lm_head`` are outside the decoder blocks and always stay full precision.
    Scales and means are rounded to ``scale_dtype`` *before* the quantizer uses them, so the
    packed checkpoint reproduces the quantized model exactly.
    """

    method: ClassVar[str] = "base"
    version: ClassVar[int] = 2  # 2: scale_dtype (version-1 dicts meant float32 scales)
    uses_hessian: ClassVar[bool] = True  # False: the driver skips the statistics pass
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Named option sets (``--preset NAME``, ``method:NAME`` in compare specs); ``default`` is the class defaults."""
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {
        "b": "blocksize", "fp8": {"scale_dtype": "float8_e4m3fn"}, "rec": "reconstruct", "ft": "finetune"}
    """Short spellings in compare specs: a letter followed by a number sets that field (``b256``), a
    bare name of a boolean field sets it (``a``), and a name mapped to a dict sets those options."""
    storage_estimate: ClassVar[float] = 16.0
    """A generous bits-per-weight guess of the packed size, for the disk-space check before a run."""

    blocksize: int = option(128, "columns per OBC block (beta)")
    percdamp: float = option(0.01, "Hessian damping as a fraction of mean(diag H); raised x10 per failed Cholesky")
    include: tuple[str, ...] = option(("*",), "fnmatch patterns of the linears to quantize (name inside the block, "
                                               "e.g. self_attn.q_proj, or the full name)")
    exclude: tuple[str, ...] = option((), "fnmatch patterns of linears to keep in full precision")
    scale_dtype: str = option("float16", "dtype the scales and means are stored (and rounded) in; float8_e4m3fn: "
                                         "8 bits, range 2^-9..448", choices=tuple(SCALE_DTYPES))
    rotate: str = option("none", "incoherence processing: hadamard quantizes W R under R^T H R, R = random signs x "
                                 "block Hadamard of the input width, and the layer rotates its input at run time",
                         choices=("none", "hadamard"), record_default=False)
    rotate_seed: int = option(0, "seed of the rotation's random signs", record_default=False)
    # --- block reconstruction (billm.reconstruct): tune each quantized block's stored scales/means to its target
    reconstruct: int = option(0, "block reconstruction: Adam steps per block tuning the stored scales and means "
                                 "(in their stored dtype) so the quantized block reproduces the full-precision "
                                 "block's output (0: off)", record_default=False)
    reconstruct_lr: float = option(1e-2, "block reconstruction: Adam learning rate, relative to each tuned value's "
                                         "magnitude", record_default=False)
    reconstruct_batch: int = option(1, "block reconstruction: calibration sequences per step", record_default=False)
    reconstruct_target: str = option("qinputs", "block reconstruction: the full-precision block's output on the "
                                                "quantized model's inputs (qinputs) or on the full-precision "
                                                "model's own inputs (fpinputs, a second activation stream)",
                                     choices=("qinputs", "fpinputs"), record_default=False)
    reconstruct_seed: int = option(0, "block reconstruction and end-to-end tuning: seed of the mini-batch draws",
                                   record_default=False)
    reconstruct_signs: bool = option(False, "block reconstruction: also flip the format's sign planes, through "
                                            "latent weights with a straight-through sign (formats that declare "
                                            "them: billm, lowrank)", record_default=False)
    reconstruct_sign_lr: float = option(0.05, "block reconstruction: Adam learning rate of the sign latents "
                                              "(they start at +-1; a sign flips when its latent crosses 0)",
                                        record_default=False)
    # --- end block reconstruction
    # --- end-to-end tuning (billm.reconstruct.finetune_model): after the last block, every stored scale/mean at once
    finetune: int = option(0, "end-to-end tuning after the last block: Adam steps tuning every stored scale and mean "
                              "of the whole quantized model (in their stored dtype) toward finetune_target on the "
                              "calibration text; the whole model runs on the quantize device (0: off)",
                           record_default=False)
    finetune_lr: float = option(1e-3, "end-to-end tuning: Adam learning rate, relative to each tuned value's magnitude",
                                record_default=False)
    finetune_batch: int = option(4, "end-to-end tuning: calibration sequences per step", record_default=False)
    finetune_target: str = option("tokens", "end-to-end tuning: the calibration text's next tokens (cross-entropy) or "
                                            "the full-precision model's next-token distribution on it (fp: KL "
                                            "divergence, from a full-precision stream kept beside the quantized one)",
                                  choices=("tokens", "fp"), record_default=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON lists -> tuples, values -> enums; then the declared choices
            object.__setattr__(self, f.name, _coerce(type(self), f.name, getattr(self, f.name)))
            choices = f.metadata.get("choices")
            check(not choices or getattr(self, f.name) in choices,
                   f"{f.name} must be one of {', '.join(choices or ())}, got {getattr(self, f.name)!r}")
        check(self.blocksize >= 1, f"blocksize must be >= 1, got {self.blocksize}")
        check(0.0 <= self.percdamp < 10.0, f"percdamp must be in [0, 10), got {self.percdamp}")
        check(len(self.include) > 0, "include needs at least one pattern")
        check(self.rotate_seed >= 0, f"rotate_seed must be >= 0, got {self.rotate_seed}")
        check(self.reconstruct >= 0, f"reconstruct must be >= 0 steps, got {self.reconstruct}")
        check(self.reconstruct_lr > 0, f"reconstruct_lr must be > 0, got {self.reconstruct_lr}")
        check(self.reconstruct_batch >= 1, f"reconstruct_batch must be >= 1, got {self.reconstruct_batch}")
        check(self.reconstruct_seed >= 0, f"reconstruct_seed must be >= 0, got {self.reconstruct_seed}")
        check(self.reconstruct_sign_lr > 0, f"reconstruct_sign_lr must be > 0, got {self.reconstruct_sign_lr}")
        check(self.finetune >= 0, f"finetune must be >= 0 steps, got {self.finetune}")
        check(self.finetune_lr > 0, f"finetune_lr must be > 0, got {self.finetune_lr}")
        check(self.finetune_batch >= 1, f"finetune_batch must be >= 1, got {self.finetune_batch}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with ``method`` and ``version``."""
        out: dict[str, Any] = {"method": self.method, "version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not f.metadata.get("record_default", True) and v == f.default:
                continue
            out[f.name] = v.value if isinstance(v, enum.Enum) else (list(v) if isinstance(v, tuple) else v)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing ones take defaults."""
        d = dict(d)
        d.pop("method", None)
        version = d.pop("version", cls.version)
        check(version <= cls.version, f"{cls.method} config version {version} is newer than this billm ({cls.version})")
        if version < 2:
            d.setdefault("scale_dtype", "float32")  # version 1 kept scales in float32
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        check(not unknown, f"unknown {cls.method} option(s): {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str = "default", **overrides: Any) -> "QuantConfig":
        """The option set ``name`` (``default``: the class defaults), with ``overrides`` on top."""
        if name != "default" and name not in cls.presets:
            raise BillmError(f"{cls.method} has no preset {name!r}; its presets: "
                             f"{', '.join(['default', *cls.presets])}")
        return cls(**{**cls.presets.get(name, {}), **overrides})

    @classmethod
    def from_spec(cls, opts: str) -> "QuantConfig":
        """A config from the options part of a compare spec (``plus+b256``, ``w2g128a``, ``nosba+output``).

        Tokens joined by ``+``: a preset name; ``field=value``; a boolean field's name (or ``no`` +
        it); a value of a field with fixed choices; or short spellings from :attr:`abbrev` run
        together (``w2g128``). Presets apply first, the other tokens over them.
        """
        tokens = [t for t in opts.split("+") if t]
        base = [t for t in tokens if t in cls.presets]
        check(len(base) <= 1, f"{cls.method}: at most one preset in a spec, got {base}")
        kw: dict[str, Any] = {}
        for tok in tokens:
            if tok not in cls.presets:
                kw.update(_spec_token(cls, tok))
        return cls.preset(base[0] if base else "default", **kw)

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _parse_value(cls: type, name: str, text: str) -> Any:
    kind = _field_types(cls)[name]
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if kind in (int, float):
            return kind(text)
    except ValueError:
        raise BillmError(f"{cls.method}: {name} needs a {kind.__name__}, got {text!r}") from None
    check(typing.get_origin(kind) is not tuple, f"{cls.method}: {name} cannot be set in a compare spec")
    return text


def _choice_fields(cls: type) -> dict[str, str]:
    """value -> field, over the fields whose values are a fixed set (enums, declared choices)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        kind = _field_types(cls)[f.name]
        values = [e.value for e in kind] if isinstance(kind, type) and issubclass(kind, enum.Enum) else \
            list(f.metadata.get("choices", ()))
        out.update({v: f.name for v in values})
    return out


def _spec_token(cls: type, tok: str) -> dict[str, Any]:
    """The options one compare-spec token sets (see :meth:`QuantConfig.from_spec`)."""
    types = _field_types(cls)
    if "=" in tok:
        key, _, value = tok.partition("=")
        key = key.replace("-", "_")
        check(key in types, f"{cls.method} has no option {key!r}")
        return {key: _parse_value(cls, key, value)}
    name = tok.replace("-", "_")
    for flag, value in ((name, True), (name[2:].lstrip("_"), False) if name.startswith("no") else (None, None)):
        if flag is not None and types.get(flag) is bool:
            return {flag: value}
    if isinstance(cls.abbrev.get(tok), Mapping):
        return dict(cls.abbrev[tok])
    choices = _choice_fields(cls)
    if tok in choices:
        return {choices[tok]: tok}
    return _compact_spec(cls, tok)


def _compact_spec(cls: type, tok: str) -> dict[str, Any]:
    """``w2g128a`` -> bits=2, groupsize=128, act_order=True, through :attr:`QuantConfig.abbrev`."""
    short = sorted((k for k, v in cls.abbrev.items() if isinstance(v, str)), key=len, reverse=True)
    out: dict[str, Any] = {}
    rest = tok
    while rest:
        key = next((k for k in short if rest.startswith(k)), None)
        m = re.match(r"-?\d+(\.\d+)?", rest[len(key):]) if key else None
        if key is None:
            raise BillmError(f"unknown {cls.method} option {tok!r} in a compare spec; options are "
                             f"presets {sorted(cls.presets)}, field=value, boolean fields "
                             f"{sorted(k for k, t in _field_types(cls).items() if t is bool)}, values "
                             f"{sorted(_choice_fields(cls))}, or short forms {sorted(cls.abbrev)}")
        name = cls.abbrev[key]
        if m is None:
            check(_field_types(cls)[name] is bool, f"{cls.method}: {key!r} in {tok!r} needs a number ({name})")
            out[name] = True
            rest = rest[len(key):]
        else:
            out[name] = _parse_value(cls, name, m.group(0))
            rest = rest[len(key) + len(m.group(0)):]
    return out


__all__ = ["SCALE_DTYPES", "BreakGrid", "QuantConfig", "SalientMetric", "SearchDomain", "check", "option"]
