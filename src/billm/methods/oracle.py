"""Straightforward loop versions of the two searches: the oracle for tests and benchmarks.

One masked binarization per candidate, exactly as the method is described; slow but obviously
right. :mod:`billm.methods.search` must choose the same candidate with the same error.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .binarize import binarize, sq_error
from .search import salient_candidates


def salient_search_loop(M: Tensor, col_score: Tensor, k_min: int, k_max: int, order: int = 2,
                        centred: bool = True) -> tuple[int, Tensor]:
    """Loop oracle of :func:`billm.methods.search.search_salient_columns`: (k, errors (K,))."""
    rows, cols = M.shape
    x = M.to(torch.float64)
    ranking = torch.argsort(col_score, descending=True, stable=True)
    errors = []
    for k in salient_candidates(cols, k_min, k_max).tolist():
        sal = torch.zeros(rows, cols, dtype=torch.bool, device=M.device)
        sal[:, ranking[:k]] = True
        est = binarize(x, sal, order, centred) + binarize(x, ~sal, order, centred)
        errors.append(sq_error(x, est))
    errors_t = torch.stack(errors)
    best = int(torch.argmin(errors_t))
    return int(salient_candidates(cols, k_min, k_max)[best]), errors_t


def break_search_loop(M: Tensor, salient: Tensor, candidates: Tensor, order: int = 1,
                      centred: bool = True) -> tuple[int, Tensor]:
    """Loop oracle of :func:`billm.methods.search.search_break_point`: (index, errors (C,))."""
    x = M.to(torch.float64)
    non = (~salient).unsqueeze(0).expand_as(x)
    errors = []
    for p in candidates.tolist():
        big = x.abs() >= p
        conc, sparse = non & ~big, non & big
        est = binarize(x, conc, order, centred) + binarize(x, sparse, order, centred)
        errors.append((((x - est) ** 2) * non).sum())
    errors_t = torch.stack(errors)
    return int(torch.argmin(errors_t)), errors_t
