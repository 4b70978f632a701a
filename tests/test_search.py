"""The vectorised searches must choose what the loop oracle chooses, with the same error."""

import pytest
import torch

from billm.methods.oracle import break_search_loop, salient_search_loop
from billm.methods.search import (
    break_candidates, salient_candidates, search_break_point, search_salient_columns, split_masks,
)


def _block(rows, cols, seed, heavy=4, salience=False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    W[:, torch.randperm(cols, generator=g)[:heavy]] *= 5  # a few outlier columns, as in real layers
    if salience:
        d = torch.rand(cols, generator=g) + 0.2
        return W**2 / d**2
    return W


CASES = [pytest.param(rows, cols, seed, sal, id=f"{rows}x{cols}-seed{seed}-{'salience' if sal else 'weights'}")
         for rows, cols, seed, sal in
         [(48, 128, 0, False), (48, 128, 1, True), (33, 70, 2, False), (7, 128, 3, True), (64, 20, 4, False)]]


def _centred_id(centred: bool) -> str:
    return "centred" if centred else "uncentred"


@pytest.mark.parametrize("rows,cols,seed,sal", CASES)
@pytest.mark.parametrize("order", [1, 2], ids=lambda o: f"order{o}")
@pytest.mark.parametrize("centred", [True, False], ids=_centred_id)
def test_salient_search_matches_oracle(rows, cols, seed, sal, order, centred):
    M = _block(rows, cols, seed, salience=sal)
    score = (M**2).sum(0) if not sal else M.sum(0)
    fast = search_salient_columns(M, score, 1, 49, order, centred)
    k, errs = salient_search_loop(M, score, 1, 49, order, centred)
    assert fast.k == k
    torch.testing.assert_close(fast.errors, errs, rtol=1e-9, atol=1e-7)
    assert fast.columns.tolist() == torch.argsort(score, descending=True, stable=True)[:k].tolist()


@pytest.mark.parametrize("rows,cols,seed,sal", CASES)
@pytest.mark.parametrize("grid,n", [("quantile", 81), ("linear", 9)], ids=["quantile81", "linear9"])
@pytest.mark.parametrize("order,centred", [(1, True), (1, False), (2, True)],
                         ids=["order1-centred", "order1-uncentred", "order2-centred"])
def test_break_search_matches_oracle(rows, cols, seed, sal, grid, n, order, centred):
    M = _block(rows, cols, seed, salience=sal)
    salient = torch.zeros(cols, dtype=torch.bool)
    salient[: min(5, cols - 1)] = True
    cands = break_candidates(M, salient, grid, n)
    fast = search_break_point(M, salient, cands, order, centred)
    idx, errs = break_search_loop(M, salient, cands, order, centred)
    assert fast.index == idx
    torch.testing.assert_close(fast.errors, errs, rtol=1e-9, atol=1e-7)


def test_salient_candidates_keep_one_nonsalient_column():
    assert salient_candidates(128, 1, 49).tolist() == list(range(1, 50))
    assert salient_candidates(20, 3, 30).tolist() == list(range(3, 20))
    assert salient_candidates(1, 1, 49).tolist() == [0]


def test_search_finds_planted_outlier_columns():
    g = torch.Generator().manual_seed(5)
    W = torch.randn(256, 128, generator=g) * 0.1
    planted = [3, 40, 77]
    W[:, planted] = torch.randn(256, 3, generator=g) * 3
    res = search_salient_columns(W, (W**2).sum(0), 1, 49, order=2)
    assert set(planted) <= set(res.columns.tolist())
    assert res.k <= 6


def test_tied_candidates_choose_first():
    # Many zero entries make low quantiles equal: identical groups must keep the first index.
    M = torch.zeros(8, 64)
    M[:, :8] = torch.randn(8, 8)
    salient = torch.zeros(64, dtype=torch.bool)
    cands = break_candidates(M, salient, "quantile", 81)
    fast = search_break_point(M, salient, cands)
    idx, errs = break_search_loop(M, salient, cands)
    assert fast.index == idx


def test_split_masks_partition():
    M = torch.randn(10, 32)
    salient = torch.zeros(32, dtype=torch.bool)
    salient[[1, 5]] = True
    conc, sparse, sal = split_masks(M, salient, 0.5)
    total = conc.int() + sparse.int() + sal.int()
    assert torch.all(total == 1)
    assert torch.all(M[conc].abs() < 0.5) and torch.all(M[sparse].abs() >= 0.5)
