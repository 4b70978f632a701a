"""Hessian statistics and block-wise OBC/GPTQ error compensation (pure tensor math).

``H = 2/N * sum_x x x^T`` accumulates as a running mean in float32, N counting calibration
sequences as GPTQ does (the scale cancels in every use). :func:`prepare_hessian` handles dead
columns and damping and returns ``U = chol(H^-1)`` (upper). :func:`obc_quantize` walks the columns
in blocks; a per-block quantizer callback returns the block's quantized values (and optionally its
own scaled error, for methods such as GPTQ that compensate inside the block), and the block's error
is propagated to all later columns: ``W[:, end:] -= E @ U[block, end:]``.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Union

import torch
from torch import Tensor

from ..errors import QuantizationError
from ..memory import return_freed_memory

log = logging.getLogger(__name__)


class HessianAccumulator:
    """Running-mean accumulator of ``2/N * sum x x^T`` for one linear's inputs.

    Each batch is one matrix product over all its tokens (one large GEMM is faster than tiles of
    the upper triangle, although those do fewer flops). :attr:`H` makes it exactly symmetric (the
    upper triangle mirrored) and checks it once when read: any NaN/Inf input, or an input so large
    its square overflows, leaves a non-finite diagonal entry, so no per-batch scan is needed.

    Args:
        cols: input features of the linear.
        device: where H lives (the block's device).
        tile: tile width of the mirroring (bounds its temporaries).
        name: the layer(s) it serves, for error messages.
    """

    def __init__(self, cols: int, device: Union[str, torch.device] = "cpu", tile: int = 256, name: str = "a layer") -> None:
        self.name = name
        self._H = torch.zeros(cols, cols, dtype=torch.float32, device=device)
        self.nsamples = 0
        self._bounds = [(i, min(i + tile, cols)) for i in range(0, cols, tile)]
        self._ready = False

    @property
    def H(self) -> Tensor:
        """The full symmetric (cols, cols) Hessian.

        Raises:
            QuantizationError: the inputs had NaN/Inf entries (or overflowed when squared).
        """
        if not self._ready:
            if not torch.isfinite(torch.diagonal(self._H)).all():
                raise QuantizationError(f"non-finite values (NaN/Inf) in the calibration inputs of {self.name}: an "
                                        "earlier layer overflows (try a float32 model, or exclude the layer)")
            for a, (i0, i1) in enumerate(self._bounds):
                d = self._H[i0:i1, i0:i1]  # (tile, tile) diagonal tile
                d.copy_(torch.triu(d) + torch.triu(d, 1).t())
                for j0, j1 in self._bounds[a + 1:]:
                    self._H[j0:j1, i0:i1] = self._H[i0:i1, j0:j1].t()
            self._ready = True
        return self._H

    def add_batch(self, x: Tensor) -> None:
        """Add inputs ``x`` of shape (batch, ..., cols); each leading-batch row counts as one sample."""
        if x.dim() == 1:
            x = x.unsqueeze(0)
        batch = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1]).to(device=self._H.device, dtype=torch.float32)  # (tokens, cols)
        total = self.nsamples + batch
        self._H.addmm_(x.t(), x, beta=self.nsamples / total, alpha=2.0 / total)
        self.nsamples = total
        self._ready = False


@dataclass
class PreparedHessian:
    """Output of :func:`prepare_hessian`.

    Attributes:
        U: (cols, cols) upper Cholesky factor of the damped H^-1.
        dead: (cols,) bool, columns with zero input energy (their weights were zeroed).
        percdamp: the damping actually used (may exceed the requested one after retries).
        damping: what was added to the diagonal (``percdamp`` times its mean, dead columns counted as 1).
    """

    U: Tensor
    dead: Tensor
    percdamp: float
    damping: float = 0.0


def prepare_hessian(H: Tensor, W: Tensor, percdamp: float = 0.01, max_tries: int = 6,
                    release: bool = False) -> PreparedHessian:
    """Dead columns, damping and ``U = chol(H^-1)`` (upper): :func:`factor_hessian`, and ``W[:, dead] = 0``.

    Dead columns (``H_jj == 0``) carry no input: their weights are zeroed in ``W`` (modified in
    place). The factor is shared by every linear fed the same ``H`` tensor; treat it as read-only.

    ``release``: the method reads ``H`` no more. Where its caller is that Hessian's last user (inside
    :func:`last_use_of_factor`), ``H``'s memory is then freed at once: ``H`` is left empty (a later read
    fails), and the factor stands in for it in the caller's error figures (:func:`output_error`).
    Elsewhere it changes nothing.
    """
    prep = factor_hessian(H, percdamp, max_tries)
    W[:, prep.dead] = 0
    last = _LAST_USE.get()
    if release and last is not None:
        last.factor, last.released = prep, H
        H.set_()  # (0,): the (cols, cols) storage goes now, unless some other tensor still views it
    return prep


def factor_hessian(H: Tensor, percdamp: float = 0.01, max_tries: int = 6) -> PreparedHessian:
    """``U = chol(H^-1)`` (upper) of the damped ``H`` (``H`` itself is not modified).

    Dead columns (``H_jj == 0``) get ``H_jj = 1``. Damping ``percdamp * mean(diag H)`` is added to
    the diagonal; if the Cholesky factorisation fails it is multiplied by 10 and retried, up to
    ``max_tries`` times. Linears fed the same input (q/k/v, gate/up) get the very same ``H`` tensor,
    so the last result is kept, keyed by that tensor (identity and in-place version) and the
    arguments, and released with it: the factorisation runs once per distinct Hessian.

    Raises:
        QuantizationError: non-finite H, or no damping made it positive definite.
    """
    key = (H._version, percdamp, max_tries)
    keep = _LAST_USE.get() is None
    prep = _MEMO.get(H, key, keep)
    if prep is None:
        prep = _factor(H, percdamp, max_tries)
        if keep:
            _MEMO.put(H, key, prep)
    return prep


@dataclass
class LastUse:
    """What :func:`last_use_of_factor` yields: the Hessian a method released (``prepare_hessian(..., release=True)``),
    left empty, and its factor, for the error figures in its place; both None until a method releases one."""

    factor: Optional[PreparedHessian] = None
    released: Optional[Tensor] = None

    def factor_of(self, H: Optional[Tensor]) -> Optional[PreparedHessian]:
        """The factor standing in for ``H`` if ``H`` is the very tensor released, else None."""
        return self.factor if H is not None and self.released is H else None


_LAST_USE: contextvars.ContextVar[Optional[LastUse]] = contextvars.ContextVar("billm_last_use", default=None)


@contextmanager
def last_use_of_factor(last: bool = True) -> Iterator[Optional[LastUse]]:
    """Inside it, the caller is its Hessian's last user. :func:`factor_hessian` hands its factor over rather than
    keeping it for the next linear fed the same Hessian, so the (cols, cols) factor is freed as soon as the method is
    done with it, not when the Hessian is; and a method that releases the Hessian (``prepare_hessian(release=True)``)
    frees it at once, leaving its factor in the :class:`LastUse` yielded. Stored values are the same either way.
    ``last=False``: a later linear may read the Hessian; nothing is handed over or released (whatever an enclosing
    block said), and None is yielded."""
    use = LastUse() if last else None
    token = _LAST_USE.set(use)
    try:
        yield use
    finally:
        _LAST_USE.reset(token)


class _FactorMemo:
    """The last Hessian's factor: kept while that very tensor lives, dropped before the next is made."""

    def __init__(self) -> None:
        self._ref: Optional["weakref.ref[Tensor]"] = None
        self._key: Optional[tuple] = None
        self._prep: Optional[PreparedHessian] = None
        self._lock = threading.RLock()  # re-entrant: the weakref callback may run inside a locked section

    def get(self, H: Tensor, key: tuple, keep: bool = True) -> Optional[PreparedHessian]:
        """The factor stored for ``H`` under ``key``, else None; either way the memo lets go of it unless ``keep``
        and it matched (a stored factor is not kept alive beside the next one)."""
        with self._lock:
            prep = self._prep if self._ref is not None and self._ref() is H and self._key == key else None
            if prep is None or not keep:
                self._drop()
            return prep

    def put(self, H: Tensor, key: tuple, prep: PreparedHessian) -> None:
        with self._lock:
            self._ref, self._key, self._prep = weakref.ref(H, self._forget), key, prep

    def _forget(self, ref: "weakref.ref[Tensor]") -> None:
        """H was freed: drop its factor (unless a newer one has replaced it)."""
        with self._lock:
            if self._ref is ref:
                self._drop()

    def _drop(self) -> None:
        self._ref = self._key = self._prep = None


_MEMO = _FactorMemo()


def all_finite(t: Tensor, rows: int = 256) -> bool:
    """Whether every entry of ``t`` is finite, checked ``rows`` rows at a time (``isfinite`` of a whole matrix
    builds temporaries larger than the matrix)."""
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def _factor(H: Tensor, percdamp: float, max_tries: int) -> PreparedHessian:
    """On the CPU one (cols, cols) matrix alive besides ``H``: LAPACK works in place, ``out=`` its own input. For an
    exactly symmetric ``H`` (the accumulator's) it works on a column-major view, which it needs no copy of; else
    on the matrix itself, through one internal column-major copy a step. Bit for bit the out-of-place steps either
    way. Elsewhere at most three matrices at once, each step freeing the one before it."""
    if not all_finite(H):
        raise QuantizationError("the Hessian has non-finite entries (NaN/Inf in the calibration activations?)")
    cols = H.shape[0]
    diag = torch.arange(cols, device=H.device)
    dead = torch.diag(H) == 0
    dead_idx = dead.nonzero().squeeze(1)  # (n_dead,)
    mean_diag = torch.mean(torch.diag(H).masked_fill(dead, 1.0))
    in_place = H.device.type == "cpu"
    column_major = in_place and bool(torch.equal(H, H.mT))  # the same matrix read either way
    damp_frac = percdamp
    for attempt in range(max_tries):
        A = H.clone()  # (cols, cols): the damped H, then L, then H^-1, then U
        A[dead_idx, dead_idx] = 1.0
        A[diag, diag] += damp_frac * mean_diag
        if column_major:
            A = A.mT
        info = torch.zeros((), dtype=torch.int32, device=H.device)
        if in_place:
            torch.linalg.cholesky_ex(A, out=(A, info))
        else:
            A, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            A = torch.cholesky_inverse(A, out=A) if in_place else torch.cholesky_inverse(A)
            if in_place:
                torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            else:
                A, info = torch.linalg.cholesky_ex(A, upper=True)
            if int(info) == 0 and all_finite(A):
                if attempt:
                    log.warning("Hessian not positive definite at percdamp=%g; used percdamp=%g", percdamp, damp_frac)
                return PreparedHessian(U=A, dead=dead, percdamp=damp_frac, damping=float(damp_frac * mean_diag))
        del A
        damp_frac = damp_frac * 10 if damp_frac > 0 else 1e-4
    raise QuantizationError(
        f"the Hessian could not be factored even with percdamp={damp_frac / 10:g} "
        f"({max_tries} tries from {percdamp:g}); the calibration data may be degenerate")


_TRIM_EVERY = 4  # blocks between handing freed host memory back (about 5% of a BiLLM layer's time on the CPU)

BlockQuantizer = Callable[[Tensor, Tensor, int], Union[Tensor, tuple[Tensor, Optional[Tensor]]]]
"""Callback ``(Wb (rows, b), Ub (b, b), start_col) -> Qb`` or ``(Qb, Eb)``.

``Eb`` is the block's scaled error ``(w - q) / U_jj`` per column when the method computes it
itself (GPTQ, which compensates inside the block); ``None`` or a bare ``Qb`` lets the loop use
``(Wb - Qb) / diag(Ub)``.
"""


@dataclass
class OBCTimes:
    """Seconds spent in the quantizer callbacks and in the error propagation."""

    quantize: float = 0.0
    compensate: float = 0.0


def obc_quantize(W: Tensor, U: Tensor, blocksize: int, quantize_block: BlockQuantizer,
                 times: Optional[OBCTimes] = None) -> Tensor:
    """Quantize ``W`` block by block with OBC error compensation between blocks.

    Args:
        W: (rows, cols) float32 weights; modified in place: it absorbs the compensation, and each block's columns
            are overwritten by their quantized values once done (no second matrix of W's size).
        U: (cols, cols) upper Cholesky factor of H^-1 (from :func:`prepare_hessian`).
        blocksize: columns per block.
        quantize_block: see :data:`BlockQuantizer`.
        times: optional accumulator of where the time went.

    Returns:
        Q (rows, cols), the quantized weights: ``W`` itself.
    """
    rows, cols = W.shape
    for b, st in enumerate(range(0, cols, blocksize)):
        if b and b % _TRIM_EVERY == 0 and W.device.type == "cpu":
            return_freed_memory()  # the earlier blocks' freed temporaries: the heap does not grow with the layer's width
        ed = min(st + blocksize, cols)
        Wb = W[:, st:ed]  # (rows, b), already compensated by earlier blocks
        Ub = U[st:ed, st:ed]  # (b, b)
        t0 = time.perf_counter()
        out = quantize_block(Wb.clone(), Ub, st)
        Qb, Eb = out if isinstance(out, tuple) else (out, None)
        t1 = time.perf_counter()
        if Eb is None:
            Eb = (Wb - Qb) / torch.diag(Ub).unsqueeze(0)  # (rows, b)
        if ed < cols:
            W[:, ed:] -= Eb.matmul(U[st:ed, ed:])
        Wb.copy_(Qb)  # the block's columns are done: they hold its quantized values from now on
        if times is not None:
            times.quantize += t1 - t0
            times.compensate += time.perf_counter() - t1
    return W


def hessian_error(W: Tensor, Q: Tensor, H: Tensor, rows: int = 256) -> tuple[float, float]:
    """Output error proxy ``tr(D H D^T)`` with ``D = W - Q``, absolute and relative to ``tr(W H W^T)``."""
    num = output_error(W, Q, H, rows=rows)
    den = output_energy(W, H, rows)
    return num, num / den if den > 0 else float("nan")


def output_energy(W: Tensor, H: Tensor, rows: int = 256) -> float:
    """``tr(W H W^T)`` for ``W`` (out, cols), ``H`` (cols, cols); summed over ``rows`` rows at a time (temporaries of
    (rows, cols), not of the weight's size)."""
    total = 0.0
    for i in range(0, W.shape[0], rows):
        w = W[i:i + rows].float()  # (rows, cols)
        total += float(torch.sum((w @ H) * w))
    return total


def output_error(W: Tensor, Q: Tensor, H: Optional[Tensor] = None, factor: Optional[PreparedHessian] = None,
                 rows: int = 256) -> float:
    """``tr(D H D^T)``, ``D = W - Q`` (out, cols), from ``H`` or, where a method released it, from its ``factor``.

    With ``U`` the factor of the damped ``H_d = H + damping * I`` (dead columns' diagonal set to 1 first), ``H_d^-1 =
    U^T U``, so for ``D`` zero on the dead columns (where ``H`` is zero) ``tr(D H D^T) = ||D U^-1||^2 - damping
    ||D||^2``: one triangular solve of (rows, cols) a chunk. Equal to the product with ``H`` up to the float32
    factor's rounding: within 1e-5 relative on real layers, but up to percents for a Hessian of a handful of
    samples damped far below ``percdamp=0.01`` (its factor is then ill-conditioned).
    """
    if (H is None) == (factor is None):
        raise ValueError("output_error needs either H or its factor")
    total = 0.0
    for i in range(0, W.shape[0], rows):
        d = W[i:i + rows].float() - Q[i:i + rows].float()  # (rows, cols)
        if H is not None:
            total += float(torch.sum((d @ H) * d))
            continue
        d[:, factor.dead] = 0
        x = torch.linalg.solve_triangular(factor.U, d, upper=True, left=False)  # (rows, cols): x U = d
        total += float(torch.sum(x * x)) - factor.damping * float(torch.sum(d * d))
    return total


def damped_hessian(H: Tensor, dead: Tensor, percdamp: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """The Hessian :func:`prepare_hessian` factored (dead columns set to 1 on the diagonal, damping added).

    Args:
        H: (cols, cols) the undamped Hessian; left as it is.
        dead: (cols,) bool, the columns no input reached.
        percdamp: damping as a fraction of the mean diagonal.
        dtype: the result's dtype.

    Returns:
        (cols, cols) a new ``dtype`` matrix. Its diagonal is damped in ``H``'s own dtype, then widened with the
        rest, so the values are those of the damping in ``H``'s dtype (one copy, where damping then widening
        made two).
    """
    diag = torch.diag(H).clone()  # (cols,) in H's dtype
    diag[dead] = 1.0
    diag += percdamp * torch.mean(diag)
    out = H.to(dtype, copy=True)
    out.diagonal().copy_(diag)
    return out
