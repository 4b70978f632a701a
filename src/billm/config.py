"""Typed, versioned, serialisable quantization configs.

Every method has a frozen dataclass config; configs serialise with :meth:`to_dict` into a
checkpoint or a report so a result can be reproduced from its file alone, and come back with
:func:`config_from_dict`.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import BillmError


class SalientMetric(str, enum.Enum):
    """How salience of a weight is measured."""

    HESSIAN = "hessian"  # s_ij = w_ij^2 / U_jj^2  (U = chol(H^-1), upper)
    MAGNITUDE = "magnitude"  # s_ij = |w_ij|


class SearchDomain(str, enum.Enum):
    """Which matrix the two searches (salient columns, break point) score their error on."""

    WEIGHT = "weight"  # the paper: error of the binarized weights
    SALIENCE = "salience"  # the public reference code: error of the binarized salience matrix


class BreakGrid(str, enum.Enum):
    """Candidate break points for the non-salient split."""

    QUANTILE = "quantile"  # quantiles 10 %..90 % of |M| (reference code: 81 of them)
    LINEAR = "linear"  # p = i * max|M|, i in 0.1..0.9 (paper: 9 of them)


_CONFIGS: dict[str, type["QuantConfig"]] = {}


def register_config(cls: type["QuantConfig"]) -> type["QuantConfig"]:
    """Class decorator: make a config constructible by its ``method`` name."""
    _CONFIGS[cls.method] = cls
    return cls


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise BillmError(f"invalid config: {msg}")


@dataclass(frozen=True)
class QuantConfig:
    """Options shared by every method.

    Attributes:
        blocksize: columns per OBC block (beta).
        percdamp: Hessian damping, as a fraction of mean(diag H); raised automatically
            (x10 per retry) if the Cholesky factorisation fails.
        include: fnmatch patterns of the linears to quantize, matched against the name inside
            the decoder block (``self_attn.q_proj``) and the full name. Embeddings and
            ``lm_head`` are outside the decoder blocks and always stay full precision.
        exclude: fnmatch patterns of linears to leave in full precision.
        scale_dtype: dtype the stored scales and means are kept in (``float16``, ``float32``,
            or ``float8_e4m3fn``: 8-bit, range 2^-9..448, 3 mantissa bits). The quantizer rounds them to it *before* using them, so the packed
            checkpoint reproduces the quantized model exactly.
    """

    method: ClassVar[str] = "base"
    version: ClassVar[int] = 2  # 2: scale_dtype (version-1 dicts meant float32 scales)
    uses_hessian: ClassVar[bool] = True  # False: the driver skips the statistics pass

    blocksize: int = 128
    percdamp: float = 0.01
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        # Accept lists from JSON / callers but store tuples (frozen, hashable).
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        _check(self.blocksize >= 1, f"blocksize must be >= 1, got {self.blocksize}")
        _check(0.0 <= self.percdamp < 10.0, f"percdamp must be in [0, 10), got {self.percdamp}")
        _check(len(self.include) > 0, "include needs at least one pattern")
        _check(self.scale_dtype in ("float16", "float32", "float8_e4m3fn"),
               f"scale_dtype must be float16, float32 or float8_e4m3fn, got {self.scale_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, with ``method`` and ``version``."""
        out: dict[str, Any] = {"method": self.method, "version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
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

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@register_config
@dataclass(frozen=True)
class BiLLMConfig(QuantConfig):
    """BiLLM: structured salient columns (residual binarization) + split non-salient weights.

    Attributes:
        salient_metric: ``hessian`` (w^2 / U_jj^2) or ``magnitude`` (|w|).
        search_domain: ``salience`` (reference code: search on the salience matrix) or
            ``weight`` (paper: search on the weights).
        min_salient_cols, max_salient_cols: the salient column counts k tried per block.
        salient_search_order: binarization order used to score both groups while choosing k.
        salient_order: binarization order of the salient columns (2 = residual approximation).
        break_grid, n_break_candidates: candidate break points of the non-salient split.
        centred: subtract a per-row mean before each binarization (reference code) — one more
            stored value per group and row.
        intra_block: beyond BiLLM — fix each block's groups, scales and means first, then
            binarize its columns one by one, pushing each column's error onto the block's
            remaining columns (GPTQ inside the block) as well as onto later blocks.
        refine_rounds: beyond BiLLM — rounds of least-squares scales (and means) alternated with
            re-chosen signs per group and row (0: off). No-op for plain order-1 groups.
        refit: beyond BiLLM — after the whole layer is binarized, re-solve every scale (and
            mean) of each row for the least output error ``(w - q) H (w - q)^T``, signs fixed.
    """

    method: ClassVar[str] = "billm"

    # Defaults = the paper's text, the best of the variants measured on SmolLM2 (README, "Which
    # variant"): WikiText-2 ppl 3133 vs 18197 for the reference code's choices.
    salient_metric: SalientMetric = SalientMetric.HESSIAN
    search_domain: SearchDomain = SearchDomain.WEIGHT
    min_salient_cols: int = 3
    max_salient_cols: int = 30
    salient_search_order: int = 1
    salient_order: int = 2
    break_grid: BreakGrid = BreakGrid.LINEAR
    n_break_candidates: int = 9
    centred: bool = False
    intra_block: bool = False
    refine_rounds: int = 0
    refit: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, enum_cls in (("salient_metric", SalientMetric), ("search_domain", SearchDomain), ("break_grid", BreakGrid)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, enum_cls(value))
            except ValueError:
                choices = ", ".join(e.value for e in enum_cls)
                raise BillmError(f"invalid config: {name}={value!r}; choose one of: {choices}") from None
        _check(0 <= self.min_salient_cols <= self.max_salient_cols,
               f"need 0 <= min_salient_cols <= max_salient_cols, got {self.min_salient_cols}, {self.max_salient_cols}")
        _check(self.salient_search_order in (1, 2), "salient_search_order must be 1 or 2")
        _check(self.salient_order in (1, 2), "salient_order must be 1 or 2")
        _check(self.n_break_candidates >= 1, "n_break_candidates must be >= 1")
        _check(0 <= self.refine_rounds <= 20, f"refine_rounds must be in 0..20, got {self.refine_rounds}")

    @classmethod
    def reference(cls, **overrides: Any) -> "BiLLMConfig":
        """Exactly the public reference implementation's choices (DESIGN.md §5), float32 scales included."""
        base = dict(salient_metric="hessian", search_domain="salience", min_salient_cols=1, max_salient_cols=49,
                    salient_search_order=2, salient_order=2, break_grid="quantile", n_break_candidates=81, centred=True,
                    scale_dtype="float32")
        return cls(**{**base, **overrides})

    @classmethod
    def plus(cls, **overrides: Any) -> "BiLLMConfig":
        """Beyond BiLLM at the same storage: the paper's variant + in-block GPTQ + output-error refit of the scales.

        The best combination measured on SmolLM2 (``docs/results/beyond.md``): WikiText-2 perplexity
        515 vs 7276 for plain BiLLM; adding refined scales made it worse (3973).
        """
        return cls.paper(**{**dict(intra_block=True, refit=True), **overrides})

    @classmethod
    def paper(cls, **overrides: Any) -> "BiLLMConfig":
        """The paper's text: weight-domain searches, k in 3..30 scored at order 1, p = 0.1..0.9 * max|w|."""
        base = dict(salient_metric="hessian", search_domain="weight", min_salient_cols=3, max_salient_cols=30,
                    salient_search_order=1, salient_order=2, break_grid="linear", n_break_candidates=9, centred=False)
        return cls(**{**base, **overrides})


@dataclass(frozen=True)
class _GridConfig(QuantConfig):
    """Integer-grid methods: ``bits`` per weight, one min-max range per row or per group of columns."""

    bits: int = 4
    groupsize: int = -1  # -1: one scale/zero per output channel

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(1 <= self.bits <= 8, f"bits must be in 1..8, got {self.bits}")
        _check(self.groupsize == -1 or self.groupsize >= 1, f"groupsize must be -1 or >= 1, got {self.groupsize}")


@register_config
@dataclass(frozen=True)
class RTNConfig(_GridConfig):
    """Round-to-nearest, asymmetric min-max, per output channel or per group of ``groupsize`` columns."""

    method: ClassVar[str] = "rtn"
    uses_hessian: ClassVar[bool] = False


@register_config
@dataclass(frozen=True)
class GPTQConfig(_GridConfig):
    """GPTQ: column-by-column rounding with Hessian-based error compensation (lazy block updates)."""

    method: ClassVar[str] = "gptq"
    act_order: bool = False  # quantize columns in order of descending Hessian diagonal


@register_config
@dataclass(frozen=True)
class SliMConfig(_GridConfig):
    """SliM-LLM: GPTQ with salience-driven mixed precision per group of input columns.

    ``bits`` is the layer's average width; groups of ``groupsize`` columns get ``bits - 1``,
    ``bits`` or ``bits + 1``.

    Attributes:
        sba: salience-determined bit allocation. The groups are ranked by summed salience
            ``w^2 / U_jj^2``; the ``k`` most salient gain a bit and the ``k`` least salient lose one.
            ``k`` is chosen for the least error (``sba_error``) of the min-max (or SQC) rounding.
            Off: every group at ``bits`` (plain GPTQ).
        sqc: salience-weighted quantizer calibration. Each row of each group picks the clipping of its
            asymmetric range that minimises ``sum omega (w - q)^2``. ``omega`` is ``1 + tau`` on the
            group row's locally salient weights (salience above mean + 3 std), 1 elsewhere.
            Off: min-max ranges.
        tau: extra weight of locally salient weights in the SQC error.
        sba_error: what SBA's choice of k minimises: ``diag`` (default), GPTQ's own per-column
            loss ``sum (w - q)^2 / U_jj^2`` of the rounded weights, the error compensation cannot
            remove; or ``output``, the full ``tr(D H D^T)`` of the rounded weights, which ignores the
            compensation that follows. Measured on SmolLM2 (``docs/results/slim``): ``diag`` 595 /
            56.5 WikiText-2 perplexity at 2 / 3 bits, ``output`` 831 / 60.7.
        clip_steps, max_shrink: SQC tries ``clip_steps + 1`` ranges, shrunk by 0 .. ``max_shrink``.
    """

    method: ClassVar[str] = "slim"

    bits: int = 2
    groupsize: int = 128
    sba: bool = True
    sqc: bool = True
    tau: float = 1.0
    clip_steps: int = 20
    max_shrink: float = 0.5
    sba_error: str = "diag"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.sba_error in ("output", "diag"), f"sba_error must be 'output' or 'diag', got {self.sba_error!r}")
        _check(2 <= self.bits <= 7, f"slim needs an average of 2..7 bits (groups use bits-1..bits+1), got {self.bits}")
        _check(self.groupsize >= 1, f"slim allocates bits per group: groupsize must be >= 1, got {self.groupsize}")
        _check(self.tau >= 0, f"tau must be >= 0, got {self.tau}")
        _check(self.clip_steps >= 0, f"clip_steps must be >= 0, got {self.clip_steps}")
        _check(0 <= self.max_shrink < 1, f"max_shrink must be in [0, 1), got {self.max_shrink}")


@register_config
@dataclass(frozen=True)
class SignConfig(QuantConfig):
    """Plain 1-bit binarization with a per-row scale (XNOR-style), optionally with OBC compensation."""

    method: ClassVar[str] = "sign"
    centred: bool = False
    obc: bool = True

    @property
    def uses_hessian(self) -> bool:  # type: ignore[override]
        return self.obc


@register_config
@dataclass(frozen=True)
class PBLLMConfig(QuantConfig):
    """PB-LLM (post-training): a fraction of the weights kept at 8 bits, the rest binarized, GPTQ compensation.

    Attributes:
        salient_fraction: share of each block's weights chosen as salient (unstructured).
        salient_metric: ``hessian`` (w^2 / U_jj^2) or ``magnitude``.
        salient_bits: bits of the salient weights (min-max per row over them).
    """

    method: ClassVar[str] = "pbllm"
    salient_fraction: float = 0.1
    salient_metric: SalientMetric = SalientMetric.HESSIAN
    salient_bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            object.__setattr__(self, "salient_metric", SalientMetric(self.salient_metric))
        except ValueError:
            raise BillmError(f"invalid config: salient_metric={self.salient_metric!r}") from None
        _check(0.0 <= self.salient_fraction < 1.0, f"salient_fraction must be in [0, 1), got {self.salient_fraction}")
        _check(2 <= self.salient_bits <= 8, f"salient_bits must be in 2..8, got {self.salient_bits}")


def config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """Build the right config class from a dict carrying ``method``."""
    method = d.get("method")
    if method not in _CONFIGS:
        raise BillmError(f"unknown method {method!r}; known: {', '.join(sorted(_CONFIGS))}")
    return _CONFIGS[method].from_dict(d)


def known_methods() -> list[str]:
    """Names of the methods that have a config."""
    return sorted(_CONFIGS)


__all__ = [
    "BiLLMConfig", "GPTQConfig", "PBLLMConfig", "RTNConfig", "SignConfig", "SliMConfig", "BreakGrid", "QuantConfig", "SalientMetric", "SearchDomain",
    "config_from_dict", "known_methods", "register_config",
]
