"""BiLLM on one weight matrix: salient columns + split non-salient weights, inside the OBC loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, BreakGrid, QuantConfig, SalientMetric, SearchDomain, check, option
from ..kernels.bitpack import pack_bits, packed_len, unpack_bits
from ..kernels.layout import BiLLMPlanes, aligned, grouped_planes
from ..packing.formats import (FieldSpec, Format, Meta, Shape, StoredWeight, Tensors, block_index, n_blocks,
                               pack_planes, per_column, pm1, register_format, round_to_stored, scale_dtype, SignPlanes)
from .binarize import binarize_params
from .gptq import gptq_block
from .obc import OBCTimes, damped_hessian, obc_quantize, prepare_hessian
from .refine import refine_group, refit_scales
from .registry import WeightResult, register_method
from .search import (break_candidates, search_break_output, search_break_point, search_salient_columns,
                     search_salient_output, search_sparse_columns_output, split_masks)


# ----------------------------------------------------------------------------- config

_PAPER = dict(salient_metric="hessian", search_domain="weight", min_salient_cols=3, max_salient_cols=30,
              salient_search_order=1, salient_order=2, break_grid="linear", n_break_candidates=9, centred=False)


@dataclass(frozen=True)
class BiLLMConfig(QuantConfig):
    """BiLLM: structured salient columns (residual binarization) + split non-salient weights.

    Defaults = the paper's text (compared with the reference code's choices in
    ``docs/results/pareto``). Presets: ``paper`` (the same), ``reference`` (the public reference code's
    choices, float32 scales included: docs/methods.md, "Paper and reference variants"), ``plus`` (beyond BiLLM at the same storage:
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
        check(0 <= self.min_salient_cols <= self.max_salient_cols,
               f"need 0 <= min_salient_cols <= max_salient_cols, got {self.min_salient_cols}, {self.max_salient_cols}")
        check(self.salient_search_order in (1, 2), "salient_search_order must be 1 or 2")
        check(self.salient_order in (1, 2), "salient_order must be 1 or 2")
        check(self.n_break_candidates >= 1, "n_break_candidates must be >= 1")
        check(0 <= self.refine_rounds <= 20, f"refine_rounds must be in 0..20, got {self.refine_rounds}")

    @classmethod
    def reference(cls, **overrides: Any) -> "BiLLMConfig":
        """The public reference implementation's choices (docs/methods.md), float32 scales included."""
        return cls.preset("reference", **overrides)

    @classmethod
    def paper(cls, **overrides: Any) -> "BiLLMConfig":
        """The paper's text: weight-domain searches, k in 3..30 scored at order 1, p = 0.1..0.9 * max|w|."""
        return cls.preset("paper", **overrides)

    @classmethod
    def plus(cls, **overrides: Any) -> "BiLLMConfig":
        """Beyond BiLLM at the same storage: the paper's variant + in-block GPTQ + output-error refit of the scales."""
        return cls.preset("plus", **overrides)



# ----------------------------------------------------------------------------- stored format: billm

BILLM_SLOTS = ("concentrated", "sparse", "salient1", "salient2")


def billm_values(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Optional[Tensor], scales: Tensor,
                 means: Optional[Tensor], blocksize: int) -> Tensor:
    """Decode BiLLM from unpacked bits.

    Args:
        s1: (r, c) bool first sign plane (or float +-1: block reconstruction's straight-through signs).
        salient: (c,) bool salient-column flags.
        sparse: (r, c) bool, True for the sparse group (ignored on salient columns).
        s2: (r, c) bool second plane (used on salient columns; or float +-1), or None for order 1.
        scales: (nb, 2 + order, r) float32, slots as :data:`BILLM_SLOTS`.
        means: same shape as ``scales`` or None (not centred).
        blocksize: columns per block.

    Returns:
        (r, c) float32: ``a1 * s1 + m1`` with the group's (a1, m1), plus ``a2 * s2 + m2`` on
        salient columns.
    """
    r, c = s1.shape
    blk = block_index(c, blocksize, s1.device)
    sal = salient.unsqueeze(0)  # (1, c)

    def slot(t: Tensor, i: int) -> Tensor:
        return per_column(t[:, i, :].t(), blk)  # (r, c)

    def first(t: Tensor) -> Tensor:
        return torch.where(sal, slot(t, 2), torch.where(sparse, slot(t, 1), slot(t, 0)))

    q = first(scales) * _pm(s1)
    if means is not None:
        q = q + first(means)
    if s2 is not None:
        q2 = torch.where(sal, slot(scales, 3), 0.0) * _pm(s2)
        if means is not None:
            q2 = q2 + torch.where(sal, slot(means, 3), 0.0)
        q = q + q2
    return q


def _pm(plane: Tensor) -> Tensor:
    """A sign plane as float +-1: bool planes through :func:`pm1`, float ones (already +-1) as they are."""
    return plane if plane.is_floating_point() else pm1(plane)


def _column_split(meta: dict[str, Any]) -> bool:
    """Whether the group bitmap holds one bit per non-salient column (``split: column``), not one per weight."""
    return meta.get("split", "weight") == "column"


def partition_fields(shape: Shape, n_salient: int, order: int, column_split: bool = False) -> dict[str, FieldSpec]:
    """The sign planes, group bitmap and salient-column mask of BiLLM's partition (ARB-LLM keeps the same)."""
    r, c = shape
    group = (packed_len(c - n_salient),) if column_split else (r, packed_len(c - n_salient))
    f = {"signs": FieldSpec((r, packed_len(c)), torch.uint8, "signs"),
         "group": FieldSpec(group, torch.uint8, "group bitmap"),
         "salient_mask": FieldSpec((packed_len(c),), torch.uint8, "salient-column mask")}
    if order == 2:
        f["signs2"] = FieldSpec((r, packed_len(n_salient)), torch.uint8, "salient 2nd signs")
    return f


def _billm_fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    r, c = shape
    order, sd = meta["salient_order"], scale_dtype(meta)
    nb = n_blocks(c, meta["blocksize"])
    f = {**partition_fields(shape, meta["n_salient"], order, _column_split(meta)),
         "scales": FieldSpec((nb, 2 + order, r), sd, "scales")}
    if meta["centred"]:
        f["means"] = FieldSpec((nb, 2 + order, r), sd, "means")
    return f


def unpack_partition(t: dict[str, Tensor], shape: tuple[int, int], n_salient: int, order: int) -> tuple[Tensor, ...]:
    """(s1, salient, sparse, s2) as full bool tensors from the packed partition fields (s2 None at order 1)."""
    r, c = shape
    s1 = unpack_bits(t["signs"], c)
    sal = unpack_bits(t["salient_mask"], c)
    if int(sal.sum()) != n_salient:
        raise ValueError(f"the salient-column mask has {int(sal.sum())} columns set, the map says {n_salient}")
    sparse = torch.zeros(r, c, dtype=torch.bool, device=s1.device)
    sparse[:, ~sal] = unpack_bits(t["group"], c - n_salient)  # (c - k,) per column, broadcast over rows, or (r, c - k)
    s2 = None
    if order == 2:
        s2 = torch.zeros(r, c, dtype=torch.bool, device=s1.device)
        s2[:, sal] = unpack_bits(t["signs2"], n_salient)
    return s1, sal, sparse, s2


def billm_unpack(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> tuple[Tensor, ...]:
    """(s1, salient, sparse, s2) as full bool tensors from the packed BiLLM fields."""
    return unpack_partition(t, shape, meta["n_salient"], meta["salient_order"])


def _billm_decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    s1, sal, sparse, s2 = billm_unpack(t, shape, meta)
    means = t["means"].float() if meta["centred"] else None
    return billm_values(s1, sal, sparse, s2, t["scales"].float(), means, meta["blocksize"])


def billm_pack(s1: Tensor, salient: Tensor, sparse: Tensor, s2: Optional[Tensor], scales: Tensor,
               means: Optional[Tensor], meta: dict[str, Any]) -> dict[str, Tensor]:
    """Packed BiLLM fields from full bool planes and (nb, slots, r) float32 scales/means."""
    sd = scale_dtype(meta)
    group = sparse[:, ~salient].contiguous()  # (r, c - k)
    if _column_split(meta):
        if not torch.equal(group, group[:1].expand_as(group)):
            raise ValueError("split 'column': the sparse group must hold whole columns")
        group = group[0]  # (c - k,)
    out = {"signs": pack_bits(s1), "group": pack_bits(group),
           "salient_mask": pack_bits(salient), "scales": scales.to(sd)}
    if s2 is not None:
        out["signs2"] = pack_bits(s2[:, salient].contiguous())
    if means is not None:
        out["means"] = means.to(sd)
    return out


def _billm_weight_bits(shape: Shape, meta: Meta) -> float:
    cols, k = shape[1], meta["n_salient"]
    return (meta["salient_order"] * k + (cols - k)) / cols


def _billm_layout(t: Tensors, shape: Shape, meta: Meta) -> BiLLMPlanes:
    bs = meta["blocksize"]
    s1, sal, sparse, s2 = billm_unpack(t, shape, meta)
    if s2 is None:
        s2 = torch.zeros_like(s1)

    def plane(x: Tensor) -> Tensor:  # (r, c) bool -> (r, nbytes), each block on a byte boundary
        return grouped_planes(x.to(torch.int32), 1, bs)[0]

    # scales in fp16 (fp8 and fp16 values are exact in it), fp32 only when stored so
    sdt = torch.float32 if t["scales"].dtype == torch.float32 else torch.float16

    def per_row(x: Tensor) -> Tensor:  # (nb, slots, r) -> (r, nb, 4); order 1 has no second salient slot
        x = x.to(sdt).permute(2, 0, 1)
        return torch.nn.functional.pad(x, (0, 4 - x.shape[2])).contiguous()

    s1p = t["signs"] if aligned(shape[1], bs) else plane(s1)  # the stored plane itself when already aligned
    return BiLLMPlanes(s1p, plane(sparse & ~sal.unsqueeze(0)), plane(s2 & sal.unsqueeze(0)), plane(sal.unsqueeze(0))[0],
                       per_row(t["scales"]), per_row(t["means"]) if meta["centred"] else None, bs, shape[1])


def _unpack_signs(t: Tensors, shape: Shape, meta: Meta) -> dict[str, Tensor]:
    """The sign planes as stored: ``signs`` (r, c) and, at order 2, ``signs2`` (r, k) of the k salient columns."""
    out = {"signs": unpack_bits(t["signs"], shape[1])}
    if meta["salient_order"] == 2:
        out["signs2"] = unpack_bits(t["signs2"], meta["n_salient"])
    return out


def _decode_signs(t: Tensors, planes: dict[str, Tensor], shape: Shape, meta: Meta) -> Tensor:
    """:func:`_billm_decode` with the sign planes given as float +-1 (``signs`` (r, c), ``signs2`` (r, k)); the second
    plane is -1 off the salient columns, as the stored decode reads it there (where its scale is 0)."""
    _, sal, sparse, _ = billm_unpack(t, shape, meta)
    s2 = None
    if "signs2" in planes:
        cols = sal.nonzero().squeeze(1)  # (k,)
        s2 = torch.full(shape, -1.0, device=sal.device).index_copy(1, cols, planes["signs2"])  # (r, c)
    means = t["means"].float() if meta["centred"] else None
    return billm_values(planes["signs"], sal, sparse, s2, t["scales"].float(), means, meta["blocksize"])


BILLM_SIGNS = SignPlanes(("signs", "signs2"), _unpack_signs, pack_planes, _decode_signs)
BILLM_FORMAT = register_format(Format("billm", _billm_fields, _billm_decode, _billm_weight_bits, _billm_layout,
                                      signs=BILLM_SIGNS))



# ----------------------------------------------------------------------------- quantizer



def salience(Wb: Tensor, Ub: Tensor, metric: SalientMetric) -> Tensor:
    """Per-weight salience of a block: ``w^2 / U_jj^2`` (hessian) or ``|w|`` (magnitude); (rows, b)."""
    if metric == SalientMetric.HESSIAN:
        return Wb**2 / torch.diag(Ub).unsqueeze(0) ** 2
    return Wb.abs()


@dataclass
class BlockCode:
    """One block's BiLLM code, unpacked: what the checkpoint stores for it.

    Attributes:
        s1: (rows, b) bool first sign plane (every entry).
        salient: (b,) bool salient-column flags.
        sparse: (rows, b) bool, True for the non-salient entries of the sparse group.
        s2: (rows, b) bool second plane (meaningful on salient columns) or None for order 1.
        scales, means: (1, 2 + order, rows) float32 per group and pass (``means`` None when not
            centred); slots as :data:`BILLM_SLOTS`.
    """

    s1: Tensor
    salient: Tensor
    sparse: Tensor
    s2: Optional[Tensor]
    scales: Tensor
    means: Optional[Tensor]

    def decode(self) -> Tensor:
        """The block's dequantized weights (rows, b), by the checkpoint's own decoder."""
        return billm_values(self.s1, self.salient, self.sparse, self.s2, self.scales, self.means, self.s1.shape[1])


def billm_block(Wb: Tensor, Ub: Tensor, cfg: BiLLMConfig) -> tuple[Tensor, BlockCode, Tensor, float]:
    """Binarize one block the BiLLM way.

    Args:
        Wb: (rows, b) compensated weights of the block.
        Ub: (b, b) the block's part of U = chol(H^-1).
        cfg: options.

    Returns:
        (Qb (rows, b), the block's code, salient column indices (k,) in the block, break point).
    """
    S = salience(Wb, Ub, cfg.salient_metric)  # (rows, b)
    if cfg.search_domain == SearchDomain.OUTPUT:
        return _billm_block_output(Wb, Ub, S, cfg)
    M = S if cfg.search_domain == SearchDomain.SALIENCE else Wb
    sal = search_salient_columns(M, S.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols,
                                 order=cfg.salient_search_order, centred=cfg.centred)
    smask = sal.mask(Wb.shape[1])  # (b,)
    if cfg.split == "column":
        code = encode_groups(Wb, *column_masks(M, smask, sparse_columns(M, smask, cfg.centred)), cfg)
        return code.decode(), code, sal.columns, float("nan")
    cands = break_candidates(M, smask, cfg.break_grid.value, cfg.n_break_candidates)
    brk = search_break_point(M, smask, cands, order=1, centred=cfg.centred)
    code = encode_groups(Wb, *split_masks(M, smask, brk.value), cfg)
    return code.decode(), code, sal.columns, brk.value


def _billm_block_output(Wb: Tensor, Ub: Tensor, S: Tensor, cfg: BiLLMConfig) -> tuple[Tensor, BlockCode, Tensor, float]:
    """:func:`billm_block` with both searches scored by the block's output error under H."""
    sal = search_salient_output(Wb, Ub, S.sum(dim=0), cfg.min_salient_cols, cfg.max_salient_cols,
                                cfg.salient_search_order, cfg.centred)
    smask = sal.mask(Wb.shape[1])
    if cfg.split == "column":
        sparse = search_sparse_columns_output(Wb, Ub, smask, cfg.salient_order, cfg.centred)
        code = encode_groups(Wb, *column_masks(Wb, smask, sparse), cfg)
        return code.decode(), code, sal.columns, float("nan")
    cands = break_candidates(Wb, smask, cfg.break_grid.value, cfg.n_break_candidates)
    brk = search_break_output(Wb, Ub, smask, cands, cfg.salient_order, cfg.centred)
    code = encode_groups(Wb, *split_masks(Wb, smask, brk.value), cfg)
    return code.decode(), code, sal.columns, brk.value


def sparse_columns(M: Tensor, salient: Tensor, centred: bool) -> Tensor:
    """(cols,) bool: the non-salient columns of the sparse group when the split is per column.

    The break point's search, per column: the non-salient columns ranked by mean |M|, the top j
    form the sparse group and the rest the concentrated one, each binarized at order 1, and the j
    with the least squared error of M wins (j = 0 allowed: one group).
    """
    non = (~salient).nonzero().squeeze(1)  # (n,)
    Mn = M[:, non]  # (rows, n)
    found = search_salient_columns(Mn, Mn.abs().mean(dim=0), 0, Mn.shape[1] - 1, order=1, centred=centred)
    out = torch.zeros_like(salient)
    out[non[found.columns]] = True
    return out


def column_masks(M: Tensor, salient: Tensor, sparse_cols: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(concentrated, sparse, salient) boolean (rows, cols) masks from per-column groups."""
    rows = M.shape[0]
    sal = salient.unsqueeze(0).expand(rows, -1)
    sparse = sparse_cols.unsqueeze(0).expand(rows, -1) & ~sal
    return ~sal & ~sparse, sparse.clone(), sal.clone()


def encode_groups(Wb: Tensor, conc: Tensor, sparse: Tensor, salient: Tensor, cfg: BiLLMConfig) -> BlockCode:
    """The block's code from its three (rows, b) masks: order 1 on each split group, residual on the salient."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    groups = []
    for mask, order in ((conc, 1), (sparse, 1), (salient, cfg.salient_order)):
        signs, alphas, mus = binarize_params(Wb, mask, order, cfg.centred, sd)  # (order, rows, b), (order, rows) x2
        if cfg.refine_rounds and (order > 1 or cfg.centred):  # plain order 1: mean|x| is already the LS scale
            signs, alphas, mus = refine_group(Wb, mask, signs, cfg.centred, cfg.refine_rounds, sd)
        groups.append((signs, alphas, mus))
    (sc, ac, mc), (ss, as_, ms), (sh, ah, mh) = groups
    cols = salient[0].clone() if salient.shape[0] else torch.zeros(Wb.shape[1], dtype=torch.bool, device=Wb.device)
    s1 = torch.where(salient, sh[0], torch.where(sparse, ss[0], sc[0]))
    s2 = sh[1] & salient if cfg.salient_order == 2 else None
    scales = torch.cat([ac, as_, ah]).unsqueeze(0)  # (1, 2 + order, rows)
    means = torch.cat([mc, ms, mh]).unsqueeze(0) if cfg.centred else None
    return BlockCode(s1=s1, salient=cols, sparse=sparse.clone(), s2=s2, scales=scales, means=means)


def intra_block_columns(Wb: Tensor, Ub: Tensor, code: BlockCode, start: int,
                        salient_cols: Sequence[int]) -> tuple[Tensor, Tensor]:
    """GPTQ inside a BiLLM block: groups, scales and means fixed, signs chosen column by column.

    Each column's signs are taken against the column as compensated so far (greedy residual
    order), its error is pushed onto the block's remaining columns, and ``code``'s sign planes are
    overwritten with the choices. ``salient_cols`` are the block's salient columns (absolute
    indices, on the host: the columns of ``code.salient``), so no column waits on the device.
    Returns (Qb, Eb) for :func:`~billm.methods.obc.obc_quantize`.
    """
    sc = code.scales[0].unbind(0)  # slots x (rows,)
    centred = code.means is not None
    mn = code.means[0].unbind(0) if centred else ()
    salient = frozenset(salient_cols)  # each column takes only its own branch
    sparse = code.sparse.unbind(1)  # b x (rows,) column views
    s2_plane = code.s2 is not None  # second sign plane (salient order 2): only on salient columns

    # The decoder's operations (billm_values) on one column, in its order: the same bits, the same values.
    def quant(col: int, w: Tensor) -> Tensor:
        j = col - start
        if col in salient:
            s1 = (w - mn[2] if centred else w) >= 0
            code.s1[:, j] = s1
            q = sc[2] * pm1(s1)
            if centred:
                q = q + mn[2]
            if s2_plane:
                s2 = (w - q - mn[3] if centred else w - q) >= 0
                code.s2[:, j] = s2
                q2 = sc[3] * pm1(s2)
                q = q + (q2 + mn[3] if centred else q2)
            return q
        # Not salient: the sparse or concentrated group's scale (and mean); the second plane stays 0,
        # where the decoder adds 0 * -1 = -0.0 (+ 0.0 when centred).
        g = sparse[j]
        mg = torch.where(g, mn[1], mn[0]) if centred else None  # the column's group means
        s1 = (w - mg if centred else w) >= 0
        code.s1[:, j] = s1
        q = torch.where(g, sc[1], sc[0]) * pm1(s1)
        if centred:
            q = q + mg
        if s2_plane:
            q = q + (0.0 if centred else -0.0)
        return q

    return gptq_block(Wb, Ub, start, quant)


def refit_codes(W: Tensor, H: Tensor, codes: list[BlockCode], cfg: BiLLMConfig) -> None:
    """Re-solve every block's scales (and means) for the least output error under ``H``; in place."""
    sd = SCALE_DTYPES[cfg.scale_dtype]
    slots = 2 + cfg.salient_order
    pats = []
    for c in codes:
        sal = c.salient.unsqueeze(0).expand_as(c.s1)
        masks = [~sal & ~c.sparse, ~sal & c.sparse, sal] + ([sal] if cfg.salient_order == 2 else [])
        signs = [c.s1, c.s1, c.s1] + ([c.s2] if cfg.salient_order == 2 else [])
        p = [torch.where(m, torch.where(s, 1, -1), 0).to(torch.int8) for s, m in zip(signs, masks)]
        if cfg.centred:
            p += [m.to(torch.int8) for m in masks]
        pats.append(torch.stack(p))  # (S, rows, b) int8: +-1 / 0 exactly, a quarter of float32's bytes
    patterns = torch.cat(pats, dim=2)  # (S, rows, cols)
    block_of = torch.cat([torch.full((c.s1.shape[1],), i, device=W.device) for i, c in enumerate(codes)])
    fit = refit_scales(W, H, patterns, block_of, len(codes))  # (nb, S, rows)
    for i, c in enumerate(codes):
        c.scales = round_to_stored(fit[i:i + 1, :slots], sd)
        if cfg.centred:
            c.means = round_to_stored(fit[i:i + 1, slots:], sd)


def stored_billm(codes: list[BlockCode], shape: tuple[int, int], cfg: BiLLMConfig) -> StoredWeight:
    """Join the blocks' codes into the packed stored form of the whole weight."""
    cat = lambda name: torch.cat([getattr(c, name) for c in codes], dim=-1)  # noqa: E731  along columns
    salient = cat("salient")
    meta = {"blocksize": cfg.blocksize, "salient_order": cfg.salient_order, "centred": cfg.centred,
            "n_salient": int(salient.sum()), "scale_dtype": cfg.scale_dtype}
    if cfg.split != "weight":  # recorded only when used: earlier checkpoints' maps stay as they were
        meta["split"] = cfg.split
    tensors = billm_pack(cat("s1"), salient, cat("sparse"), cat("s2") if cfg.salient_order == 2 else None,
                         torch.cat([c.scales for c in codes]), torch.cat([c.means for c in codes]) if cfg.centred else None,
                         meta)
    return StoredWeight("billm", tuple(shape), meta, tensors)


@register_method(BiLLMConfig)
def billm_quantize_weight(W: Tensor, H: Tensor, cfg: BiLLMConfig, times: Optional[OBCTimes] = None) -> WeightResult:
    """BiLLM-quantize ``W`` (rows, cols) with Hessian ``H`` (cols, cols); simulated weights and stored form."""
    W = W.to(torch.float32)  # the quantizer's own copy (the registry's contract): compensated in place
    shape = tuple(W.shape)
    prep = prepare_hessian(H, W, cfg.percdamp, release=not cfg.refit)  # the refit reads H again
    W0 = W.clone() if cfg.refit else None  # the target of the output-error refit (dead columns zeroed)
    salient: list[list[int]] = []  # per block, salient column indices (absolute)
    breaks: list[float] = []
    codes: list[BlockCode] = []

    def quantize_block(Wb: Tensor, Ub: Tensor, start: int):
        Qb, code, cols_, p = billm_block(Wb, Ub, cfg)
        salient.append(sorted(c + start for c in cols_.tolist()))  # one host read a block
        breaks.append(p)
        codes.append(code)
        if cfg.intra_block:
            return intra_block_columns(Wb.clone(), Ub, code, start, salient[-1])
        return Qb

    Q = obc_quantize(W, prep.U, cfg.blocksize, quantize_block, times)
    dead, percdamp = prep.dead, prep.percdamp
    del prep  # the factor: freed here unless kept for a later linear fed the same H (obc.last_use_of_factor)
    if cfg.refit:
        del Q, W
        refit_codes(W0, damped_hessian(H, dead, percdamp), codes, cfg)
        Q = torch.cat([c.decode() for c in codes], dim=1)
    return WeightResult(q=Q, stored=stored_billm(codes, shape, cfg), info={
        "salient_cols": sum(len(s) for s in salient), "salient_columns": salient, "break_points": breaks,
        "dead_cols": int(dead.sum()), "percdamp_used": percdamp,
    })
