"""The low-rank binary method (``lowrank``, NanoQuant's formulation): rank from bits, the ADMM and scale fits,
the stored form, and a model round trip."""

import itertools

import pytest
import torch

import billm
from billm import LowRankConfig
from billm.errors import BillmError
from billm.kernels.bitpack import unpack_bits
from billm.methods import get_method
from billm.methods.lowrank import (
    admm_factors, choose_rank, descend_columns, descend_rows, fit_scales, fit_scales_exact, quadratic_error, refine_factors, stored_bits,
    svid, weighted_error,
)
from billm.packing.formats import pm1


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (192, 576), (4096, 11008)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bits", [1.0, 0.8, 0.55])
def test_rank_from_target_bits_is_the_largest_whose_bytes_fit(shape, bits):
    rows, cols = shape
    r = choose_rank(rows, cols, bits, 16)
    cost = lambda k: (rows * -(-k // 8) + k * -(-cols // 8) + 2 * (rows + cols)) * 8 / (rows * cols)  # noqa: E731
    assert cost(r) <= bits < cost(r + 1)
    assert r == stored_bits_rank(rows, cols, bits)


def stored_bits_rank(rows, cols, bits):
    """The same choice by brute force over every rank."""
    return max(k for k in range(1, min(rows, cols) + 1) if stored_bits(rows, cols, k, 16) <= bits * rows * cols)


def test_rank_is_1_when_nothing_fits_and_at_most_the_smaller_side():
    assert choose_rank(32, 64, 0.8, 16) == 1  # fp16 scales alone cost 0.75 bits a weight here
    assert choose_rank(16, 4096, 40.0, 16) == 16


def test_svid_keeps_the_signs_and_recovers_a_signed_rank_one_magnitude():
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(7, generator=g) + 0.5, torch.rand(5, generator=g) + 0.5
    s = pm1(torch.rand(7, 5, generator=g) > 0.5)
    m = s * (u[:, None] * v[None, :])  # already signs times a rank-1 magnitude: a fixed point
    torch.testing.assert_close(svid(m, iters=50), m, rtol=1e-5, atol=1e-6)
    x = torch.randn(7, 5, generator=g)
    out = svid(x)
    assert torch.equal(out >= 0, x >= 0) and torch.linalg.matrix_rank(out.abs()) == 1


def test_scale_fits_never_raise_the_weighted_error():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(12, 20, generator=g)
    m = pm1(torch.rand(12, 3, generator=g) > 0.5) @ pm1(torch.rand(3, 20, generator=g) > 0.5)
    c = torch.rand(20, generator=g) + 0.1
    start = weighted_error(w, m * 0.1, c)
    _, _, errors = fit_scales(w, m, c, torch.full((12,), 0.1), torch.ones(20), rounds=6, sd=None)
    assert errors[0] < start and all(b <= a * (1 + 1e-6) for a, b in zip(errors, errors[1:]))


def test_admm_signs_fit_a_binary_low_rank_matrix_better_than_signs_of_the_svd():
    # A planted W = diag(s) U V diag(t) + noise. The ADMM is an initialiser: it does not find the planted signs
    # (a combinatorial search; on this matrix it leaves 44 % of the energy, the planted signs 0.001 %), but it
    # must beat the obvious alternative, the signs of the truncated SVD's factors (58 %).
    g = torch.Generator().manual_seed(2)
    r = 8
    u0, v0 = pm1(torch.rand(48, r, generator=g) > 0.5), pm1(torch.rand(r, 64, generator=g) > 0.5)
    s_out, s_in = torch.rand(48, generator=g) + 0.5, torch.rand(64, generator=g) + 0.5
    w = (s_out[:, None] * (u0 @ v0)) * s_in[None, :] + 0.01 * torch.randn(48, 64, generator=g)
    za, zb, errors = admm_factors(w, r, iters=100, lam=0.03, seed=0)
    ones = torch.ones(64)
    _, _, fit = fit_scales(w, pm1(za >= 0) @ pm1(zb >= 0), ones, torch.ones(48), torch.ones(64), 10, None)
    U, S, Vh = torch.linalg.svd(w)  # the obvious alternative: signs of the truncated SVD's factors
    base = pm1(U[:, :r] * S[:r] >= 0) @ pm1(Vh[:r] >= 0)
    _, _, fit_svd = fit_scales(w, base, ones, torch.ones(48), torch.ones(64), 10, None)
    total = float(w.pow(2).sum())
    assert fit[-1] / total < 0.5 and fit[-1] < 0.8 * fit_svd[-1]
    assert errors[-1] < errors[0]  # the ADMM's own iterate improved (it is not monotone step by step)


@pytest.mark.parametrize("shape,rank", [((4, 5), 1), ((3, 4), 2)], ids=["4x5-r1", "3x4-r2"])
def test_the_quantizer_is_close_to_the_best_signs_found_by_brute_force(shape, rank):
    # every sign assignment of U (rows x r) and V (r x cols), each with its least-squares scales
    rows, cols = shape
    g = torch.Generator().manual_seed(3)
    W = torch.randn(rows, cols, generator=g)
    H = torch.eye(cols)
    ones = torch.ones(cols)
    best = float("inf")
    for ub in itertools.product([False, True], repeat=rows * rank):
        u = pm1(torch.tensor(ub).view(rows, rank))
        for vb in itertools.product([False, True], repeat=rank * cols):
            m = u @ pm1(torch.tensor(vb).view(rank, cols))
            _, _, e = fit_scales(W, m, ones, torch.ones(rows), torch.ones(cols), 6, None)
            best = min(best, e[-1])
    res = get_method("lowrank")(W.clone(), H, LowRankConfig(rank=rank, scale_dtype="float32", weighted=False))
    got = weighted_error(W, res.q, ones)
    assert got <= best * 1.25 + 1e-6, (got, best)


def row_values(u, gram, target, s):
    """Each row's ``s_i^2 u^T gram u - 2 s_i u^T target_i``: (p,)."""
    return s * s * ((u @ gram) * u).sum(1) - 2 * s * (u * target).sum(1)


def test_sign_descent_lowers_every_row_until_no_single_flip_helps():
    g = torch.Generator().manual_seed(7)
    p, r = 40, 6
    a = torch.randn(r, 30, generator=g, dtype=torch.float64)
    gram, target = a @ a.t(), torch.randn(p, r, generator=g, dtype=torch.float64) * 5
    s = (torch.rand(p, generator=g, dtype=torch.float64) + 0.5) * pm1(torch.rand(p, generator=g) > 0.2)  # some < 0
    u0 = pm1(torch.rand(p, r, generator=g) > 0.5).double()
    u, flips = descend_rows(u0, gram, target, s, sweeps=50)
    before, after = row_values(u0, gram, target, s), row_values(u, gram, target, s)
    assert flips > 0 and torch.all(after <= before + 1e-9) and torch.equal(u.abs(), torch.ones_like(u))
    for k in range(r):  # a local minimum: no single flip lowers any row
        one = u.clone()
        one[:, k] *= -1
        assert torch.all(row_values(one, gram, target, s) >= after - 1e-9)
    best = torch.stack([row_values(pm1(torch.tensor(bits)).double().expand(p, r), gram, target, s)
                        for bits in itertools.product([False, True], repeat=r)]).min(0).values
    # a local search, not an exhaustive one: here it closes 84 % of the gap to the exhaustive optimum, and 17 of the
    # 40 rows reach it
    assert float((before - after).sum()) >= 0.75 * float((before - best).sum())
    assert int((after <= best + 1e-9).sum()) >= p // 4


def test_column_descent_with_error_feedback_beats_each_column_alone_under_correlated_inputs(random_problem):
    W, H = random_problem(24, 48, seed=10)
    W, H = W.double(), H.double() + 0.5  # strongly correlated inputs
    g = torch.Generator().manual_seed(10)
    a = torch.randn(24, 6, generator=g, dtype=torch.float64)
    v0 = pm1(torch.rand(6, 48, generator=g) > 0.5).double()
    s_in = torch.rand(48, generator=g, dtype=torch.float64) + 0.5
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    err = lambda v: quadratic_error(W, a @ v * s_in[None, :], H)  # noqa: E731
    alone = descend_columns(W, a, v0, s_in, torch.eye(48, dtype=torch.float64), 4, 8)  # no feedback: diag only
    fed = descend_columns(W, a, v0, s_in, hinv, 4, 8)
    assert err(fed) < 0.9 * err(alone) and err(alone) < err(v0)
    # with uncorrelated inputs the feedback is nothing: the same signs as the columns alone
    eye = torch.eye(48, dtype=torch.float64)
    assert torch.equal(descend_columns(W, a, v0, s_in, eye * 3, 4, 8), alone)


def test_exact_scales_zero_the_gradient_of_the_whole_hessian_error(random_problem):
    W, H = random_problem(12, 20, seed=8, outlier_cols=(3,))
    W, H = W.double(), H.double()
    g = torch.Generator().manual_seed(8)
    m = (pm1(torch.rand(12, 4, generator=g) > 0.5) @ pm1(torch.rand(4, 20, generator=g) > 0.5)).double()
    s_out, s_in = fit_scales_exact(W, m, H, torch.ones(12, dtype=torch.float64), torch.ones(20, dtype=torch.float64), None)
    so, si = s_out.clone().requires_grad_(), s_in.clone().requires_grad_()
    d = W - so[:, None] * m * si[None, :]
    ((d @ H) * d).sum().backward()
    assert float(so.grad.abs().max()) < 1e-8 * float(W.abs().max() ** 2 * H.abs().max())  # s_out: exact for s_in
    # s_in was solved for the s_out it was given (ones): its gradient there is zero
    si1 = s_in.clone().requires_grad_()
    d1 = W - m * si1[None, :]
    ((d1 @ H) * d1).sum().backward()
    assert float(si1.grad.abs().max()) < 1e-8 * float(W.abs().max() ** 2 * H.abs().max())


def test_refinement_never_raises_the_whole_hessian_error_and_beats_the_admm_alone(random_problem):
    W, H = random_problem(32, 64, seed=9, outlier_cols=(1, 17))
    H = H + 0.3 * torch.ones_like(H)  # correlated inputs: the whole H differs from its diagonal
    plain = get_method("lowrank")(W.clone(), H.clone(), LowRankConfig(rank=8, admm_iters=30, refine_rounds=0))
    refined = get_method("lowrank")(W.clone(), H.clone(), LowRankConfig(rank=8, admm_iters=30, refine_rounds=3))
    assert torch.equal(refined.stored.decode(), refined.q)
    assert quadratic_error(W, refined.q, H) < 0.9 * quadratic_error(W, plain.q, H)
    assert refined.info["refine_error"] < 1
    st = plain.stored
    h = H.double()
    h.diagonal().add_(0.01 * float(h.diagonal().mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    u = pm1(unpack_bits(st.tensors["u"], 8)).double()
    v = pm1(unpack_bits(st.tensors["v"], 64)).double()
    *_, errors = refine_factors(W.double(), u, v, st.tensors["scales_out"].double(), st.tensors["scales_in"].double(),
                                h, hinv, 4, 2, 16, None)
    assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:])) and errors[-1] < errors[0]


def test_refinement_leaves_the_hessian_as_it_is_and_fits_nothing_to_dead_inputs(random_problem):
    W, H = random_problem(32, 64, seed=11)
    H = H.double()
    H[:, :4] = 0
    H[:4, :] = 0  # no input reaches columns 0..3
    W[:, :4] *= 10  # large weights there, which a refinement that fitted them would spend its signs on
    before = H.clone()
    cfg = LowRankConfig(rank=8, admm_iters=30)
    refined = get_method("lowrank")(W.clone(), H, cfg)
    assert torch.equal(H, before)  # a float64 H is not damped in place
    plain = get_method("lowrank")(W.clone(), H, LowRankConfig(rank=8, admm_iters=30, refine_rounds=0))
    assert quadratic_error(W.double(), refined.q.double(), H) < quadratic_error(W.double(), plain.q.double(), H)


@pytest.mark.parametrize("weighted", [True, False], ids=["H-None", "unweighted"])
def test_refinement_without_a_hessian_lowers_the_plain_error(random_problem, weighted):
    W, H = random_problem(24, 40, seed=12)
    H_arg = None if weighted else H
    plain = get_method("lowrank")(W.clone(), H_arg, LowRankConfig(rank=6, admm_iters=30, refine_rounds=0,
                                                                   weighted=weighted))
    refined = get_method("lowrank")(W.clone(), H_arg, LowRankConfig(rank=6, admm_iters=30, weighted=weighted))
    assert torch.equal(refined.stored.decode(), refined.q)
    assert float((W - refined.q).pow(2).sum()) < float((W - plain.q).pow(2).sum())


def test_stored_bytes_decode_to_the_quantized_weights_and_count_every_byte(random_problem):
    W, H = random_problem(24, 96, seed=4)
    res = get_method("lowrank")(W.clone(), H, LowRankConfig(rank=16, admm_iters=20))
    st = res.stored
    assert torch.equal(st.decode(), res.q)
    rows, cols = W.shape
    assert st.storage_bits == pytest.approx((rows * 2 + 16 * cols // 8 + 2 * (rows + cols)) * 8 / (rows * cols))
    assert st.weight_bits == pytest.approx(16 * (rows + cols) / (rows * cols))
    assert res.info["rank"] == 16 and 0 < res.info["weighted_error"] < 1


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_bytes(random_problem):
    W, H = random_problem(24, 96, seed=5)
    run = lambda seed: get_method("lowrank")(W.clone(), H, LowRankConfig(rank=8, admm_iters=10, admm_seed=seed))  # noqa: E731
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a.stored.tensors[k], b.stored.tensors[k]) for k in a.stored.tensors)
    assert not torch.equal(a.stored.tensors["u"], c.stored.tensors["u"])


@pytest.mark.parametrize("bad", [{"target_bits": 0}, {"rank": -1}, {"admm_iters": 0}, {"admm_lambda": -1.0},
                                 {"scale_rounds": 0}, {"refine_rounds": -1}, {"refine_sweeps": 0}],
                         ids=lambda d: next(iter(d)))
def test_bad_options_are_refused(bad):
    with pytest.raises(BillmError, match=next(iter(bad))):
        LowRankConfig(**bad)


def test_specs_and_presets_reach_the_options():
    assert billm.config_from_spec("lowrank:tb0.8+it50") == LowRankConfig(target_bits=0.8, admm_iters=50)
    assert billm.config_from_spec("lowrank:b055") == LowRankConfig(target_bits=0.55)
    assert billm.config_from_spec("lowrank:r64") == LowRankConfig(rank=64)


def test_a_tiny_model_quantizes_saves_and_loads_with_equal_logits(tiny_model, tmp_path):
    model = tiny_model("llama", 0)
    calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = billm.quantize(model, calib, LowRankConfig(target_bits=0.8, admm_iters=20), progress=False)
    ranks = [l.info["rank"] for l in rep.layers]
    assert all(l.storage_bits <= 0.8 + 1e-9 for l, r in zip(rep.layers, ranks) if r > 1)  # rank 1: nothing fits
    assert rep.storage_bits < 1.0 and min(ranks) >= 1
    out = billm.save(model, tmp_path / "ck", report=rep)
    loaded = billm.load(out)
    ids = torch.randint(3, 120, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("path", ["dense", "lut"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_layer_multiplies_by_the_two_factors_as_decode_then_matmul_would(random_problem, dtype, path, monkeypatch):
    from billm.kernels import decode
    from billm.kernels.layout import Factors

    W, H = random_problem(24, 96, seed=6)
    res = get_method("lowrank")(W.clone(), H, LowRankConfig(rank=12, admm_iters=10))
    layout = res.stored.layout()
    assert isinstance(layout, Factors) and layout.first[0].rows == 12 and layout.rows == 24
    assert torch.equal(decode.decode_weight(layout, 96), res.q)  # the layout's weight is the format's, bit for bit
    layer = billm.PackedLinear.from_stored(res.stored)
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        billm.set_kernel(layer, "dequant")
        ref = layer(x)
        whole = []  # the factored paths never decode the whole (24, 96) weight, only each factor

        def spy(lay, cols):
            assert isinstance(lay, list), "the whole weight was decoded"
            whole.append(cols)
            return decode.grid_weight(lay, cols)

        monkeypatch.setattr(decode, "decode_weight", spy)
        billm.set_kernel(layer, path)
        y = layer(x)
    assert y.dtype == dtype and y.shape == (3, 5, 24)
    assert sorted(whole) == ([12, 96] if path == "dense" else [])  # dense: V (12 x 96), then U (24 x 12)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * float(ref.abs().max()))
