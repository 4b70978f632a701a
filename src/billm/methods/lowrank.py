"""Low-rank binary factors (NanoQuant's formulation): ``W ~ diag(s_out) U V diag(s_in)``, U and V in {-1, +1}.

At rank ``r`` an (out, in) layer stores ``r (out + in)`` sign bits and ``out + in`` scales, so the rank
sets the bits per weight continuously, below one bit too (``target_bits`` picks the rank per layer).

Initialisation, as NanoQuant describes and releases it: the weight is weighted by the square root of
each input's second moment (``diag(H)``, the calibration's ``mean x_j^2``; NanoQuant also weights the
outputs by gradient statistics, which a forward-only pass does not have), then an ADMM splits the
weighted matrix into continuous factors ``A B`` and their projections ``Z_A``, ``Z_B`` onto
sign-times-rank-1-magnitude matrices (:func:`svid`), with a penalty ``rho`` rising linearly to 1
over the iterations and a ridge ``lambda``. The exported signs are those of the projections. Then,
with the signs fixed, the two scale vectors are solved by alternating weighted least squares
(:func:`fit_scales`), each step exact, so the weighted error never rises.

Then (``refine_rounds``; not in NanoQuant) the signs and scales are refined under the whole Hessian, i.e. the
layer's output error ``tr(D H D^T)`` that the diagonal weighting only approximates (:func:`refine_factors`):
U's rows by exact coordinate descent, V's columns block by block with OBC's error feedback, the scales by exact
least squares. Scales are rounded to their stored dtype as they are set, and the stored weight decodes to
exactly what the model uses.

Block reconstruction (``--reconstruct``) tunes the two scale vectors like any format's scales, and with
``--reconstruct-signs`` the signs of U and V too, through latent weights (NanoQuant's block stage). A layer
multiplies by the two factors (:func:`lowrank_matmul`), never forming the weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

import torch
from torch import Tensor

from ..config import SCALE_DTYPES, QuantConfig, check, option
from ..kernels.bitpack import pack_bits, packed_len, unpack_bits
from ..kernels.decode import factors_values
from ..kernels.layout import Factors, GridPlanes, GridValues, grid_planes
from ..packing.formats import (
    FieldSpec, Format, SignPlanes, StoredWeight, pack_planes, pm1, register_format, round_to_stored, scale_dtype,
)
from .obc import OBCTimes, factor_hessian
from .registry import WeightResult, register_method


# ----------------------------------------------------------------------------- config

@dataclass(frozen=True)
class LowRankConfig(QuantConfig):
    """Low-rank binary factors ``diag(s_out) U V diag(s_in)`` with ADMM initialisation (NanoQuant's formulation)."""

    method: ClassVar[str] = "lowrank"
    storage_estimate: ClassVar[float] = 2.0
    abbrev: ClassVar[Mapping[str, Union[str, Mapping[str, Any]]]] = {
        **QuantConfig.abbrev, "tb": "target_bits", "r": "rank", "it": "admm_iters", "rf": "refine_rounds"}
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "b1": {"target_bits": 1.0}, "b08": {"target_bits": 0.8}, "b055": {"target_bits": 0.55}}

    target_bits: float = option(1.0, "storage bits a weight each layer's rank is chosen for: r (out + in) sign "
                                     "bits and (out + in) scales within target_bits x out x in")
    rank: int = option(0, "the rank of every layer (0: chosen from target_bits)")
    admm_iters: int = option(100, "ADMM iterations of the initialisation (NanoQuant releases 400)")
    admm_lambda: float = option(0.03, "ADMM ridge on the continuous factors")
    admm_seed: int = option(0, "seed of the ADMM's random initial factors")
    scale_rounds: int = option(8, "alternating least-squares rounds of the two scale vectors, signs fixed")
    weighted: bool = option(True, "weight the error of each input column by sqrt(diag H), its calibration "
                                  "second moment (off: plain Frobenius)")
    refine_rounds: int = option(4, "rounds of sign descent after the ADMM under the whole Hessian: U's rows by exact "
                                   "coordinate descent, V's columns block by block with OBC's error feedback "
                                   "(blocksize columns), then both scale vectors by exact least squares (0: the ADMM's "
                                   "signs as they are)")
    refine_sweeps: int = option(2, "coordinate-descent sweeps over each factor's signs per refinement round")

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.target_bits > 0, f"target_bits must be > 0, got {self.target_bits}")
        check(self.rank >= 0, f"rank must be >= 0, got {self.rank}")
        check(self.admm_iters >= 1, f"admm_iters must be >= 1, got {self.admm_iters}")
        check(self.admm_lambda >= 0, f"admm_lambda must be >= 0, got {self.admm_lambda}")
        check(self.admm_seed >= 0, f"admm_seed must be >= 0, got {self.admm_seed}")
        check(self.scale_rounds >= 1, f"scale_rounds must be >= 1, got {self.scale_rounds}")
        check(self.refine_rounds >= 0, f"refine_rounds must be >= 0, got {self.refine_rounds}")
        check(self.refine_sweeps >= 1, f"refine_sweeps must be >= 1, got {self.refine_sweeps}")

    @property
    def uses_hessian(self) -> bool:  # type: ignore[override]
        return self.weighted


# ----------------------------------------------------------------------------- stored format: lowrank

def stored_bits(rows: int, cols: int, rank: int, scale_bits: int) -> int:
    """Bits a layer of ``rank`` stores: U's rows of ``rank`` packed signs, V's ``rank`` rows of ``cols`` packed
    signs, and ``rows + cols`` scales."""
    return 8 * (rows * -(-rank // 8) + rank * -(-cols // 8)) + scale_bits * (rows + cols)


def choose_rank(rows: int, cols: int, target_bits: float, scale_bits: int) -> int:
    """The largest rank (at most ``min(rows, cols)``) whose stored bytes fit ``target_bits`` a weight
    (:func:`stored_bits`); 1 when none does (a layer too small for the budget: its scales alone may exceed it)."""
    budget = target_bits * rows * cols
    r = min(rows, cols, max(1, math.floor(budget / (rows + cols))))  # an upper bound: each rank costs >= rows + cols
    while r > 1 and stored_bits(rows, cols, r, scale_bits) > budget:
        r -= 1
    return r


def _fields(shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, FieldSpec]:
    out, inp = shape
    r = meta["rank"]
    sd = scale_dtype(meta)
    return {"u": FieldSpec((out, packed_len(r)), torch.uint8, "signs"),
            "v": FieldSpec((r, packed_len(inp)), torch.uint8, "signs"),
            "scales_out": FieldSpec((out,), sd, "scales"), "scales_in": FieldSpec((inp,), sd, "scales")}


def _decode(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Tensor:
    r = meta["rank"]
    return factors_values(pm1(unpack_bits(t["u"], r)), pm1(unpack_bits(t["v"], shape[1])), t["scales_out"].float(),
                          t["scales_in"].float())


def _layout(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> Factors:
    """V (r, in) and U (out, r) as 1-bit grid planes of +-1 (scale 2, offset -1), with the two scale vectors: every
    path multiplies by the factors in turn, ``r (in + out)`` values a call rather than the ``in x out`` weight."""
    r, (out, inp) = meta["rank"], shape

    def signs(stored: Tensor, rows: int, cols: int) -> GridPlanes:  # (rows, cols) +-1 over one group of cols
        codes = unpack_bits(stored, cols).to(torch.int32)
        ones = torch.ones(rows, 1, device=stored.device)
        return grid_planes(codes, 1, 2 * ones, -ones, cols, stored_planes=stored.unsqueeze(0),
                           values=GridValues(ones, signed=True))

    return Factors([signs(t["v"], r, inp)], [signs(t["u"], out, r)], t["scales_in"].float(), t["scales_out"].float())


def _unpack_signs(t: dict[str, Tensor], shape: tuple[int, int], meta: dict[str, Any]) -> dict[str, Tensor]:
    return {"u": unpack_bits(t["u"], meta["rank"]), "v": unpack_bits(t["v"], shape[1])}  # (out, r), (r, in) bool


def _decode_signs(t: dict[str, Tensor], planes: dict[str, Tensor], shape: tuple[int, int],
                  meta: dict[str, Any]) -> Tensor:
    """:func:`_decode` with U and V given as float +-1 (out, r), (r, in): the same operations in the same order."""
    return factors_values(planes["u"], planes["v"], t["scales_out"].float(), t["scales_in"].float())


LOWRANK_FORMAT = register_format(Format(
    "lowrank", _fields, _decode, lambda shape, meta: meta["rank"] * (shape[0] + shape[1]) / (shape[0] * shape[1]),
    _layout, signs=SignPlanes(("u", "v"), _unpack_signs, pack_planes, _decode_signs)))


# ----------------------------------------------------------------------------- ADMM initialisation

def svid(m: Tensor, iters: int = 5) -> Tensor:
    """``sign(m) * (sigma u v^T)``: the signs of ``m`` (0 counts as +) times the best rank-1 approximation of
    ``|m|`` (its top singular triplet by ``iters`` power iterations). (p, q) -> (p, q)."""
    a = m.abs()
    v = torch.full((a.shape[1],), 1.0 / math.sqrt(a.shape[1]), dtype=a.dtype, device=a.device)  # (q,)
    u = v.new_zeros(a.shape[0])  # (p,), set by the first iteration
    for _ in range(iters):
        u = a @ v
        u = u / u.norm().clamp(min=1e-30)  # (p,)
        v = a.t() @ u  # (q,) = sigma * right singular vector
    return torch.where(m >= 0, 1.0, -1.0) * (u[:, None] * v[None, :])


def _unit_columns(z: Tensor) -> Tensor:
    return z / z.norm(dim=0, keepdim=True).clamp(min=1e-30)


def admm_factors(w: Tensor, rank: int, iters: int, lam: float, seed: int) -> tuple[Tensor, Tensor, list[float]]:
    """Binary-structured factors of ``w`` (p, q): (Z_A (p, r), Z_B (r, q), the relative error of ``Z_A Z_B``
    under its best single scale after the first and the last iteration).

    ADMM on ``min |w - A B|^2 + lam (|A|^2 + |B|^2)`` with ``A = Z_A``, ``B = Z_B`` and Z in the set
    :func:`svid` projects on (signs times a rank-1 magnitude), scaled duals, ``rho = t / iters``. Each
    factor's update regresses ``w`` on the other's projection with unit-norm columns.
    """
    p, q = w.shape
    g = torch.Generator(device="cpu").manual_seed(seed)
    std = math.sqrt(float(w.norm()) / math.sqrt(p * q * rank) + 1e-30)
    a = (torch.randn(p, rank, generator=g, device="cpu") * std).to(w.device)  # (p, r), drawn on the CPU: the same
    b = (torch.randn(rank, q, generator=g, device="cpu") * std).to(w.device)  # (r, q) draws on every device
    za, zb = svid(a), svid(b)
    la, lb = a - za, b - zb
    eye = torch.eye(rank, dtype=w.dtype, device=w.device)
    errors = []
    wn = float(w.pow(2).sum()) or 1.0
    for t in range(1, iters + 1):
        rho = t / iters
        x = _unit_columns(zb.t())  # (q, r)
        a = torch.linalg.solve(x.t() @ x + (rho + lam) * eye, (w @ x + rho * (za - la)).t()).t()  # (p, r)
        y = _unit_columns(za)  # (p, r)
        b = torch.linalg.solve(y.t() @ y + (rho + lam) * eye, y.t() @ w + rho * (zb - lb))  # (r, q)
        za, zb = svid(a + la), svid(b + lb)
        la, lb = la + a - za, lb + b - zb
        if t in (1, iters):  # the first and the last iterate (a product per iteration would double the cost)
            prod = za @ zb
            c = float((prod * w).sum()) / max(float((prod * prod).sum()), 1e-30)  # the best single scale
            errors.append(float((w - c * prod).pow(2).sum()) / wn)
    return za, zb, errors


def weighted_error(w: Tensor, q: Tensor, col_weight: Tensor) -> float:
    """``sum_ij col_weight_j (w - q)_ij^2``."""
    return float(((w - q).pow(2) * col_weight[None, :]).sum())


def fit_scales(w: Tensor, m: Tensor, col_weight: Tensor, s_out: Tensor, s_in: Tensor, rounds: int,
               sd: Optional[torch.dtype]) -> tuple[Tensor, Tensor, list[float]]:
    """Scales minimising ``sum_ij c_j (w_ij - s_out_i m_ij s_in_j)^2`` for fixed ``m = U V`` (out, in), ``c`` the
    column weights: alternating exact least squares, ``s_out`` then ``s_in`` per round, each rounded to ``sd``
    (the stored dtype) as it is set. Returns (s_out (out,), s_in (in,), the error after each half-step)."""
    errors = []
    for _ in range(rounds):
        t = m * s_in[None, :]  # (out, in)
        num, den = (w * t * col_weight).sum(1), (t * t * col_weight).sum(1)
        s_out = round_to_stored(torch.where(den > 0, num / den.clamp(min=1e-30), s_out), sd)  # (out,)
        errors.append(weighted_error(w, s_out[:, None] * t, col_weight))
        t = s_out[:, None] * m
        num, den = (w * t).sum(0), (t * t).sum(0)  # the column weight cancels within a column
        s_in = round_to_stored(torch.where(den > 0, num / den.clamp(min=1e-30), s_in), sd)  # (in,)
        errors.append(weighted_error(w, t * s_in[None, :], col_weight))
    return s_out, s_in, errors


# ----------------------------------------------------------------------------- refinement under the whole Hessian

def quadratic_error(w: Tensor, q: Tensor, h: Tensor) -> float:
    """``tr((w - q) h (w - q)^T)``: (p, q), (p, q), (q, q) -> the output error on inputs of second moment ``h``, in
    the inputs' dtype (the refinement's float64; :func:`~billm.methods.obc.output_error` works in float32)."""
    d = w - q
    return float(((d @ h) * d).sum())


def descend_rows(u: Tensor, gram: Tensor, target: Tensor, s: Tensor, sweeps: int) -> tuple[Tensor, int]:
    """Coordinate descent on the +-1 rows of ``u`` (p, r): each row minimises ``s_i^2 u^T gram u - 2 s_i u^T target_i``
    (``gram`` (r, r), ``target`` (p, r), ``s`` (p,)), one coordinate at a time for every row at once; a coordinate
    flips only where that lowers its row's value, so no row's value ever rises. Returns (a new u, the flips)."""
    u = u.clone()
    p_ = u @ gram  # (p, r): gram u for every row, kept current as signs flip
    diag = torch.diagonal(gram)  # (r,)
    flips = 0
    for _ in range(sweeps):
        n = 0
        for k in range(u.shape[1]):
            uk = u[:, k]  # (p,)
            # the change of row i's value when u_ik flips: 4 s^2 (gram_kk - u_ik (gram u)_ik) + 4 s u_ik target_ik
            gain = s * s * (diag[k] - uk * p_[:, k]) + s * uk * target[:, k]
            rows = torch.nonzero(gain < -1e-12 * (s * s * diag[k]).abs()).squeeze(1)
            if rows.numel():
                d = -2 * uk[rows]  # (n,)
                u[rows, k] += d
                p_.index_add_(0, rows, d[:, None] * gram[k][None, :])
                n += rows.numel()
        flips += n
        if n == 0:
            break
    return u, flips


def fit_scales_exact(w: Tensor, m: Tensor, h: Tensor, s_out: Tensor, s_in: Tensor,
                     sd: Optional[torch.dtype]) -> tuple[Tensor, Tensor]:
    """The scales minimising ``tr(D h D^T)``, ``D = w - diag(s_out) m diag(s_in)`` ((p, q) each, ``h`` (q, q)): ``s_in``
    by one joint solve (its normal matrix is ``h`` times the Gram of ``diag(s_out) m`` entry by entry), rounded to
    ``sd``, then each ``s_out_i`` exactly for the rounded ``s_in``, rounded. Returns (s_out (p,), s_in (q,))."""
    wh = w @ h  # (p, q)
    sm = s_out[:, None] * m  # (p, q)
    a = h * (sm.t() @ sm)  # (q, q)
    a.diagonal().add_(1e-9 * float(a.diagonal().mean()) + 1e-30)
    b = (sm * wh).sum(0)  # (q,)
    s_in = round_to_stored(torch.linalg.solve(a, b), sd)
    t = m * s_in[None, :]  # (p, q)
    den = ((t @ h) * t).sum(1)  # (p,)
    s_out = round_to_stored(torch.where(den > 0, (wh * t).sum(1) / den.clamp(min=1e-30), s_out), sd)
    return s_out, s_in


def descend_columns(w: Tensor, a: Tensor, v: Tensor, s_in: Tensor, hinv: Tensor, sweeps: int,
                    block: int) -> Tensor:
    """V's signs column block by column block with error feedback: each block's columns ``w_j ~ s_in_j a v_j`` by
    :func:`descend_rows` (for each column alone, unweighted), then the block's error is carried onto the later
    columns through ``hinv`` (``chol(h^-1)``, upper), so later columns absorb what correlated inputs make of it.
    The carried error is GPTQ's per-column form, each column's error over its diagonal entry of ``hinv``; GPTQ
    propagates inside a block first, which this does not, so it approximates the exact update for a block's
    errors ``D_b`` (``D_b hinv_bb^-1``), and the caller keeps the result only where it lowers the error.
    w (p, q), a = diag(s_out) U (p, r), v (r, q) +-1, hinv (q, q). Returns a new v."""
    w, v = w.clone(), v.clone()
    gram = a.t() @ a  # (r, r)
    for i0 in range(0, w.shape[1], block):
        i1 = min(w.shape[1], i0 + block)
        wb = w[:, i0:i1]  # (p, b), the targets with the earlier blocks' errors carried in
        vb, _ = descend_rows(v[:, i0:i1].t(), gram, wb.t() @ a, s_in[i0:i1], sweeps)  # (b, r)
        err = (wb - (a @ vb.t()) * s_in[None, i0:i1]) / torch.diagonal(hinv)[None, i0:i1]  # (p, b)
        w[:, i1:] -= err @ hinv[i0:i1, i1:]
        v[:, i0:i1] = vb.t()
    return v


def refine_factors(w: Tensor, u: Tensor, v: Tensor, s_out: Tensor, s_in: Tensor, h: Tensor, hinv: Tensor,
                   rounds: int, sweeps: int, block: int,
                   sd: Optional[torch.dtype]) -> tuple[Tensor, Tensor, Tensor, Tensor, list[float]]:
    """Rounds of: U's signs by :func:`descend_rows` under the whole ``h`` (row by row, to where no single flip
    helps); V's signs by :func:`descend_columns`, kept only where the error under ``h`` falls; both scales by
    :func:`fit_scales_exact`. w (p, q), u (p, r), v (r, q) float +-1, h (q, q) damped, hinv = chol(h^-1) upper.
    Returns (u, v, s_out, s_in, the error under ``h`` before and after each round). No step raises that error
    but the scales' rounding to ``sd`` (and the solve's 1e-9 ridge), which the last round's figure includes."""

    def error(u_: Tensor, v_: Tensor, so: Tensor, si: Tensor) -> float:
        return quadratic_error(w, so[:, None] * (u_ @ v_) * si[None, :], h)

    errors = [error(u, v, s_out, s_in)]
    for _ in range(rounds):
        m = v * s_in[None, :]  # (r, q)
        mh = m @ h  # (r, q)
        u, _ = descend_rows(u, mh @ m.t(), w @ mh.t(), s_out, sweeps)
        vc = descend_columns(w, s_out[:, None] * u, v, s_in, hinv, sweeps, block)
        if error(u, vc, s_out, s_in) < error(u, v, s_out, s_in):
            v = vc
        s_out, s_in = fit_scales_exact(w, u @ v, h, s_out, s_in, sd)
        errors.append(error(u, v, s_out, s_in))
    return u, v, s_out, s_in, errors


@register_method(LowRankConfig)
def lowrank_quantize_weight(W: Tensor, H: Optional[Tensor], cfg: LowRankConfig,
                            times: Optional[OBCTimes] = None) -> WeightResult:
    """ADMM sign factors of the input-weighted W, then least-squares scales (see the module docstring)."""
    W = W.to(torch.float32)
    rows, cols = W.shape
    sd = SCALE_DTYPES[cfg.scale_dtype]
    scale_bits = torch.finfo(sd).bits
    rank = min(cfg.rank, rows, cols) if cfg.rank else choose_rank(rows, cols, cfg.target_bits, scale_bits)
    if cfg.weighted and H is not None:
        c = torch.diagonal(H).to(W.device, torch.float32).clamp(min=0)  # (cols,) calibration second moments
        c = c / c.mean().clamp(min=1e-30) + 1e-6  # scale-free; a dead input keeps a tiny weight
    else:
        c = torch.ones(cols, dtype=torch.float32, device=W.device)
    d = c.sqrt()  # (cols,)
    za, zb, admm_errors = admm_factors(W * d[None, :], rank, cfg.admm_iters, cfg.admm_lambda, cfg.admm_seed)
    u, v = za >= 0, zb >= 0  # (rows, r), (r, cols) signs
    m = pm1(u) @ pm1(v)  # (rows, cols) integers
    # start: the ADMM factors' magnitudes carried to per-row and per-column scales, weighting undone
    b = zb / d[None, :]
    beta = math.sqrt(float(b.norm()) / max(float(za.norm()), 1e-30))
    s_out0 = (za.abs() * beta).mean(1)  # (rows,)
    s_in0 = (b.abs() / beta).mean(0)  # (cols,)
    s_out, s_in, _ = fit_scales(W, m, c, round_to_stored(s_out0, sd), round_to_stored(s_in0, sd),
                                cfg.scale_rounds, sd)
    info: dict[str, Any] = {"rank": rank, "admm_error": admm_errors[-1]}
    if cfg.refine_rounds:
        h = H.to(W.device) if cfg.weighted and H is not None else torch.eye(cols, device=W.device)  # (cols, cols)
        prep = factor_hessian(h, cfg.percdamp)  # what it factors: dead inputs' diagonal set to 1, then damped
        h = h.to(torch.float64, copy=True)  # a copy even of a float64 H, which stays as it is
        h.diagonal()[prep.dead] = 1.0
        h.diagonal().add_(prep.damping)
        w = W.double()
        w[:, prep.dead] = 0  # no input reaches these columns: nothing to fit there (as prepare_hessian does)
        uf, vf, so, si, errs = refine_factors(w, pm1(u).double(), pm1(v).double(), s_out.double(),
                                              s_in.double(), h, prep.U.to(W.device, torch.float64),
                                              cfg.refine_rounds, cfg.refine_sweeps, cfg.blocksize, sd)
        del h, w, prep
        u, v, s_out, s_in = uf > 0, vf > 0, so.float(), si.float()
        info["refine_error"] = errs[-1] / max(errs[0], 1e-300)  # the error under H after refining, relative to before
    tensors = {"u": pack_bits(u), "v": pack_bits(v), "scales_out": s_out.to(sd), "scales_in": s_in.to(sd)}
    stored = StoredWeight("lowrank", (rows, cols), {"rank": rank, "scale_dtype": cfg.scale_dtype}, tensors)
    q = _decode(stored.tensors, stored.shape, stored.meta)
    info["weighted_error"] = weighted_error(W, q, c) / max(weighted_error(W, torch.zeros_like(W), c), 1e-30)
    return WeightResult(stored=stored, q=q, info=info)
