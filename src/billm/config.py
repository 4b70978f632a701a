"""Typed, versioned, serialisable quantization configs: the one place a method's options live.

Every method has a frozen dataclass config. Its fields are the method's options: the CLI flags
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


class SBAError(str, enum.Enum):
    """What SliM-LLM's bit allocation minimises when it chooses how many groups move."""

    DIAG = "diag"  # GPTQ's per-column loss sum (w - q)^2 / U_jj^2 of the rounded weights
    OUTPUT = "output"  # the full tr(D H D^T) of the rounded weights


class BreakGrid(str, enum.Enum):
    """Candidate break points for the non-salient split."""

    QUANTILE = "quantile"  # quantiles 10 %..90 % of |M| (reference code: 81 of them)
    LINEAR = "linear"  # p = i * max|M|, i in 0.1..0.9 (paper: 9 of them)


def _check(cond: bool, msg: str) -> None:
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
        "b": "blocksize", "fp8": {"scale_dtype": "float8_e4m3fn"}, "rec": "reconstruct"}
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
    reconstruct_seed: int = option(0, "block reconstruction: seed of the mini-batch draws", record_default=False)
    # --- end block reconstruction

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # JSON lists -> tuples, values -> enums; then the declared choices
            object.__setattr__(self, f.name, _coerce(type(self), f.name, getattr(self, f.name)))
            choices = f.metadata.get("choices")
            _check(not choices or getattr(self, f.name) in choices,
                   f"{f.name} must be one of {', '.join(choices or ())}, got {getattr(self, f.name)!r}")
        _check(self.blocksize >= 1, f"blocksize must be >= 1, got {self.blocksize}")
        _check(0.0 <= self.percdamp < 10.0, f"percdamp must be in [0, 10), got {self.percdamp}")
        _check(len(self.include) > 0, "include needs at least one pattern")
        _check(self.rotate_seed >= 0, f"rotate_seed must be >= 0, got {self.rotate_seed}")
        _check(self.reconstruct >= 0, f"reconstruct must be >= 0 steps, got {self.reconstruct}")
        _check(self.reconstruct_lr > 0, f"reconstruct_lr must be > 0, got {self.reconstruct_lr}")
        _check(self.reconstruct_batch >= 1, f"reconstruct_batch must be >= 1, got {self.reconstruct_batch}")
        _check(self.reconstruct_seed >= 0, f"reconstruct_seed must be >= 0, got {self.reconstruct_seed}")

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
        _check(version <= cls.version, f"{cls.method} config version {version} is newer than this billm ({cls.version})")
        if version < 2:
            d.setdefault("scale_dtype", "float32")  # version 1 kept scales in float32
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        _check(not unknown, f"unknown {cls.method} option(s): {sorted(unknown)}")
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
        _check(len(base) <= 1, f"{cls.method}: at most one preset in a spec, got {base}")
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
    _check(typing.get_origin(kind) is not tuple, f"{cls.method}: {name} cannot be set in a compare spec")
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
        _check(key in types, f"{cls.method} has no option {key!r}")
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
            _check(_field_types(cls)[name] is bool, f"{cls.method}: {key!r} in {tok!r} needs a number ({name})")
            out[name] = True
            rest = rest[len(key):]
        else:
            out[name] = _parse_value(cls, name, m.group(0))
            rest = rest[len(key) + len(m.group(0)):]
    return out


_PAPER = dict(salient_metric="hessian", search_domain="weight", min_salient_cols=3, max_salient_cols=30,
              salient_search_order=1, salient_order=2, break_grid="linear", n_break_candidates=9, centred=False)


@dataclass(frozen=True)
class BiLLMConfig(QuantConfig):
    """BiLLM: structured salient columns (residual binarization) + split non-salient weights.

    Defaults = the paper's text (compared with the reference code's choices in
    ``docs/results/pareto``). Presets: ``paper`` (the same), ``reference`` (the public reference code's
    choices, float32 scales included: DESIGN §5), ``plus`` (beyond BiLLM at the same storage:
    the paper's variant with ``intra_block`` and ``refit``), ``compact`` (``plus`` with the
    non-salient split per column: about 1.7 storage bits), ``tiny`` (``compact`` with fp8
    scales: about 1.45) and ``wide`` (``tiny`` with the second sign plane on 88 of every 128
    columns: about 1.95).
    """

    method: ClassVar[str] = "billm"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "paper": _PAPER,
        "reference": dict(salient_metric="hessian", search_domain="salience", min_salient_cols=1, max_salient_cols=49,
                          salient_search_order=2, salient_order=2, break_grid="quantile", n_break_candidates=81,
                          centred=True, scale_dtype="float32"),
        "plus": {**_PAPER, "intra_block": True, "refit": True},
        "compact": {**_PAPER, "intra_block": True, "refit": True, "split": "column"},
        "tiny": {**_PAPER, "intra_block": True, "refit": True, "split": "column", "scale_dtype": "float8_e4m3fn"},
        "wide": {**_PAPER, "intra_block": True, "refit": True, "split": "column", "scale_dtype": "float8_e4m3fn",
                 "min_salient_cols": 88, "max_salient_cols": 88},
    }
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {
        **QuantConfig.abbrev, "intra": "intra_block", "refine": "refine_rounds"}
    storage_estimate: ClassVar[float] = 3.5

    salient_metric: SalientMetric = option(SalientMetric.HESSIAN, "salience of a weight: hessian (w^2 / U_jj^2) "
                                                                  "or magnitude (|w|)")
    search_domain: SearchDomain = option(SearchDomain.WEIGHT, "what the two searches score: the weights (paper), "
                                                              "the salience matrix (reference code) or the block's "
                                                              "output error under H (what OBC minimises)")
    min_salient_cols: int = option(3, "fewest salient columns tried per block")
    max_salient_cols: int = option(30, "most salient columns tried per block")
    salient_search_order: int = option(1, "binarization order used to score both groups while choosing k")
    salient_order: int = option(2, "binarization order of the salient columns (2: residual approximation)")
    break_grid: BreakGrid = option(BreakGrid.LINEAR, "break-point candidates: linear (i * max|w|) or quantile")
    n_break_candidates: int = option(9, "number of break-point candidates")
    centred: bool = option(False, "subtract a per-row mean before each binarization (one more stored value per "
                                  "group and row)")
    intra_block: bool = option(False, "beyond BiLLM: binarize a block column by column, pushing each column's error "
                                      "onto the block's remaining columns (groups and scales fixed first)")
    refine_rounds: int = option(0, "beyond BiLLM: rounds of least-squares scales alternated with re-chosen signs "
                                   "per group and row (0: off)")
    refit: bool = option(False, "beyond BiLLM: after the layer is binarized, re-solve every scale (and mean) of each "
                                "row for the least output error under H, signs fixed")
    split: str = option("weight", "beyond BiLLM: how the non-salient weights are split in two groups: per weight by "
                                  "the break point (a bitmap bit per weight), or per column (a bit per column)",
                        choices=("weight", "column"), record_default=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.min_salient_cols <= self.max_salient_cols,
               f"need 0 <= min_salient_cols <= max_salient_cols, got {self.min_salient_cols}, {self.max_salient_cols}")
        _check(self.salient_search_order in (1, 2), "salient_search_order must be 1 or 2")
        _check(self.salient_order in (1, 2), "salient_order must be 1 or 2")
        _check(self.n_break_candidates >= 1, "n_break_candidates must be >= 1")
        _check(0 <= self.refine_rounds <= 20, f"refine_rounds must be in 0..20, got {self.refine_rounds}")

    @classmethod
    def reference(cls, **overrides: Any) -> "BiLLMConfig":
        """The public reference implementation's choices (DESIGN.md §5), float32 scales included."""
        return cls.preset("reference", **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> "BiLLMConfig":
        """The paper's text: weight-domain searches, k in 3..30 scored at order 1, p = 0.1..0.9 * max|w|."""
        return cls.preset("paper", **overrides)

    @classmethod
    def plus(cls, **overrides: Any) -> "BiLLMConfig":
        """Beyond BiLLM at the same storage: the paper's variant + in-block GPTQ + output-error refit of the scales."""
        return cls.preset("plus", **overrides)


@dataclass(frozen=True)
class _GridConfig(QuantConfig):
    """Integer-grid methods: ``bits`` per weight, one min-max range per row or per group of columns."""

    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**QuantConfig.abbrev, "w": "bits", "g": "groupsize"}

    bits: int = option(4, "bits per weight (slim: the layer's average, groups use bits-1..bits+1)")
    groupsize: int = option(-1, "columns per scale group (-1: one range per row)")

    @property
    def storage_estimate(self) -> float:  # type: ignore[override]
        return self.bits + 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(1 <= self.bits <= 8, f"bits must be in 1..8, got {self.bits}")
        _check(self.groupsize == -1 or self.groupsize >= 1, f"groupsize must be -1 or >= 1, got {self.groupsize}")


@dataclass(frozen=True)
class RTNConfig(_GridConfig):
    """Round-to-nearest, asymmetric min-max, per output channel or per group of ``groupsize`` columns."""

    method: ClassVar[str] = "rtn"
    uses_hessian: ClassVar[bool] = False


@dataclass(frozen=True)
class GPTQConfig(_GridConfig):
    """GPTQ: column-by-column rounding with Hessian-based error compensation (lazy block updates)."""

    method: ClassVar[str] = "gptq"
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**_GridConfig.abbrev, "a": "act_order"}

    act_order: bool = option(False, "quantize columns in order of descending Hessian diagonal")


@dataclass(frozen=True)
class SliMConfig(_GridConfig):
    """SliM-LLM: GPTQ with salience-driven mixed precision per group of input columns.

    ``bits`` is the layer's average width; groups of ``groupsize`` columns get ``bits - 1``,
    ``bits`` or ``bits + 1``. SBA ranks the groups by summed salience ``w^2 / U_jj^2`` and moves a
    bit from the ``k`` least to the ``k`` most salient, ``k`` chosen for the least ``sba_error`` of
    the rounding. SQC picks each group row's clipping for the least ``sum omega (w - q)^2``,
    ``omega = 1 + tau`` on locally salient weights (salience above mean + 3 std), 1 elsewhere.
    ``sba_error``: ``diag`` (default) scores a choice by the loss GPTQ's compensation cannot remove;
    ``output`` by the rounding's whole output error, which that compensation then changes.
    """

    method: ClassVar[str] = "slim"

    bits: int = option(2, "average bits per weight (groups use bits-1..bits+1)")
    groupsize: int = option(128, "columns per group (each group has one width)")
    sba: bool = option(True, "salience-determined bit allocation (off: every group at bits, plain GPTQ)")
    sqc: bool = option(True, "salience-weighted clipping of each group row's range (off: min-max)")
    tau: float = option(1.0, "extra weight of locally salient weights in the SQC error")
    clip_steps: int = option(20, "SQC tries clip_steps + 1 ranges")
    max_shrink: float = option(0.5, "SQC shrinks the range by at most this fraction")
    sba_error: SBAError = option(SBAError.DIAG, "what SBA minimises: diag (GPTQ's per-column loss) or output "
                                                "(tr(D H D^T), ignoring the compensation that follows)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(2 <= self.bits <= 7, f"slim needs an average of 2..7 bits (groups use bits-1..bits+1), got {self.bits}")
        _check(self.groupsize >= 1, f"slim allocates bits per group: groupsize must be >= 1, got {self.groupsize}")
        _check(self.tau >= 0, f"tau must be >= 0, got {self.tau}")
        _check(self.clip_steps >= 0, f"clip_steps must be >= 0, got {self.clip_steps}")
        _check(0 <= self.max_shrink < 1, f"max_shrink must be in [0, 1), got {self.max_shrink}")


@dataclass(frozen=True)
class SignConfig(QuantConfig):
    """Plain 1-bit binarization with a per-row scale (XNOR-style), optionally with OBC compensation."""

    method: ClassVar[str] = "sign"
    storage_estimate: ClassVar[float] = 1.5

    centred: bool = option(False, "subtract a per-row mean before binarizing (one more stored value per row)")
    obc: bool = option(True, "GPTQ-style error compensation (off: no Hessian needed)")

    @property
    def uses_hessian(self) -> bool:  # type: ignore[override]
        return self.obc


@dataclass(frozen=True)
class PBLLMConfig(QuantConfig):
    """PB-LLM (post-training): a fraction of the weights kept at 8 bits, the rest binarized, GPTQ compensation."""

    method: ClassVar[str] = "pbllm"
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**QuantConfig.abbrev, "f": "salient_fraction"}
    storage_estimate: ClassVar[float] = 4.5

    salient_fraction: float = option(0.1, "share of each block's weights kept salient (unstructured)")
    salient_metric: SalientMetric = option(SalientMetric.HESSIAN, "salience of a weight: hessian or magnitude")
    salient_bits: int = option(8, "bits of the salient weights (min-max per row over them)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.salient_fraction < 1.0, f"salient_fraction must be in [0, 1), got {self.salient_fraction}")
        _check(2 <= self.salient_bits <= 8, f"salient_bits must be in 2..8, got {self.salient_bits}")


_ARB_VARIANTS = ("rc", "x", "plain")


@dataclass(frozen=True)
class ArbConfig(QuantConfig):
    """ARB-LLM: BiLLM's partition (salient columns + a bitmap splitting the rest) binarized by alternating refinement.

    Every group is binarized and then refined in ``iters`` alternating rounds: ``plain`` (ARB)
    updates a per-row mean, a per-row scale and the signs in turn; ``x`` (ARB-X) then refits mean
    and scales for the least output error under the block's Hessian; ``rc`` (ARB-RC) drops the mean
    and alternates a per-row and a per-column scale. Salient columns keep two sign planes (order 2).
    Presets: ``rc`` (the default), ``x``, ``plain``, and ``reference`` (the public code's choices:
    searches scored on the salience matrix, float32 scales; docs/methods.md).
    """

    method: ClassVar[str] = "arb"
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "rc": dict(variant="rc"),
        "x": dict(variant="x"),
        "plain": dict(variant="plain"),
        "reference": dict(variant="rc", search_domain="salience", scale_dtype="float32"),
    }
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {**QuantConfig.abbrev, "t": "iters"}
    storage_estimate: ClassVar[float] = 3.5

    variant: str = option("rc", "rc: row and column scales, no mean (ARB-RC); x: mean and row scale refit under the "
                                "Hessian (ARB-X); plain: mean, row scale and signs alternated (ARB)",
                          choices=_ARB_VARIANTS)
    iters: int = option(15, "alternating refinement rounds per group (T)")
    x_iters: int = option(15, "ARB-X: rounds of the Hessian-weighted mean and scale update after the alternation")
    salient_metric: SalientMetric = option(SalientMetric.HESSIAN, "salience of a weight: hessian (w^2 / U_jj^2) "
                                                                  "or magnitude (|w|)")
    search_domain: SearchDomain = option(SearchDomain.WEIGHT, "what the two searches score: the weights or the "
                                                              "salience matrix (public code)")
    min_salient_cols: int = option(1, "fewest salient columns tried per block")
    max_salient_cols: int = option(49, "most salient columns tried per block")
    n_break_candidates: int = option(81, "break points tried: quantiles of |w| from the 10th to the 90th percentile")

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.min_salient_cols <= self.max_salient_cols,
               f"need 0 <= min_salient_cols <= max_salient_cols, got {self.min_salient_cols}, {self.max_salient_cols}")
        _check(0 <= self.iters <= 100, f"iters must be in 0..100, got {self.iters}")
        _check(0 <= self.x_iters <= 100, f"x_iters must be in 0..100, got {self.x_iters}")
        _check(self.search_domain != SearchDomain.OUTPUT, "search_domain output is BiLLM's (arb: weight or salience)")
        _check(self.n_break_candidates >= 1, "n_break_candidates must be >= 1")


__all__ = [
    "ArbConfig", "BiLLMConfig", "BreakGrid", "GPTQConfig", "PBLLMConfig", "QuantConfig", "RTNConfig", "SBAError",
    "SCALE_DTYPES", "SalientMetric", "SearchDomain", "SignConfig", "SliMConfig", "option",
]
