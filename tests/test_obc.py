import pytest
import torch

from billm.errors import QuantizationError
from billm.methods.binarize import binarize
from billm.methods import obc
from billm.methods.obc import (HessianAccumulator, damped_hessian, factor_hessian, hessian_error, obc_quantize,
                               output_error, prepare_hessian)


def test_accumulator_is_running_mean_of_2_xxT():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]  # (batch, seq, cols)
    acc = HessianAccumulator(8)
    for x in xs:
        acc.add_batch(x)
    X = torch.cat([x.reshape(-1, 8) for x in xs])
    torch.testing.assert_close(acc.H, 2 / 6 * X.t() @ X, rtol=1e-5, atol=1e-5)
    assert acc.nsamples == 6


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e30], ids=["nan", "inf", "overflow"])
def test_accumulator_refuses_non_finite_inputs_when_read(bad):
    acc = HessianAccumulator(4, name="blocks.0.q")
    acc.add_batch(torch.randn(3, 4))
    acc.add_batch(torch.tensor([[1.0, bad, 0.0, 0.0]]))
    acc.add_batch(torch.randn(3, 4))
    with pytest.raises(QuantizationError, match="non-finite values.*blocks.0.q"):
        _ = acc.H


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(4 * n, n, generator=g)
    return 2 / (4 * n) * X.t() @ X


def test_prepare_hessian_gives_chol_of_inverse_and_zeroes_dead_columns():
    H = _spd(16)
    H[3, :] = 0
    H[:, 3] = 0
    W = torch.randn(5, 16)
    prep = prepare_hessian(H, W, 0.01)
    assert prep.dead.tolist() == [i == 3 for i in range(16)]
    assert torch.all(W[:, 3] == 0)
    Hd = H.clone()
    Hd[3, 3] = 1
    Hd += 0.01 * torch.diag(Hd).mean() * torch.eye(16)
    torch.testing.assert_close(prep.U.t() @ prep.U, torch.linalg.inv(Hd), rtol=1e-3, atol=1e-4)
    assert torch.allclose(prep.U, torch.triu(prep.U))


@pytest.mark.parametrize("symmetric", [True, False], ids=["exactly-symmetric", "rounded"])
def test_the_in_place_factorisation_is_the_out_of_place_one_bit_for_bit(symmetric):
    H = _spd(300, seed=3)
    H[7, :] = 0
    H[:, 7] = 0
    if symmetric:  # as the accumulator leaves it (a rotated Hessian is symmetric only up to rounding)
        H = torch.triu(H) + torch.triu(H, 1).t()
    assert torch.equal(H, H.t()) == symmetric
    Hd = H.clone()  # what the factorisation did before it worked in place, step by step
    Hd[7, 7] = 1.0
    diag = torch.arange(300)
    Hd[diag, diag] += 0.01 * torch.diag(Hd).mean()
    U = torch.linalg.cholesky_ex(torch.cholesky_inverse(torch.linalg.cholesky_ex(Hd)[0]), upper=True)[0]
    assert torch.equal(prepare_hessian(H, torch.zeros(2, 300), 0.01).U, U)


def test_linears_fed_one_hessian_share_one_factorisation_released_with_it(monkeypatch):
    calls = []
    real = obc._factor
    monkeypatch.setattr(obc, "_factor", lambda *a: calls.append(1) or real(*a))
    H = _spd(16)
    H[5, :] = 0
    H[:, 5] = 0
    Ws = [torch.randn(4, 16) for _ in range(3)]
    preps = [prepare_hessian(H, W, 0.01) for W in Ws]  # q, k and v: one Hessian tensor
    assert len(calls) == 1 and preps[0] is preps[1] is preps[2]
    assert all(torch.all(W[:, 5] == 0) for W in Ws)  # each weight still has its dead column zeroed
    prepare_hessian(H, torch.randn(4, 16), 0.1)  # other damping: factored again
    prepare_hessian(H.clone(), torch.randn(4, 16), 0.1)  # an equal but distinct tensor: again
    assert len(calls) == 3
    H2 = _spd(16, seed=1)
    first = factor_hessian(H2)
    H2.mul_(2)  # changed in place: the old factor must not be reused
    assert factor_hessian(H2) is not first and len(calls) == 5
    torch.testing.assert_close(factor_hessian(H2).U, first.U / 2**0.5, rtol=1e-4, atol=1e-5)
    del H2, first
    assert obc._MEMO._prep is None  # the factor is freed with its Hessian


def test_damped_hessian_is_the_float32_damping_widened_in_one_copy():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g)
    X[:, [3, 7]] = 0  # two dead columns
    H = X.t() @ X
    dead = torch.diag(H) == 0
    ref = H.clone()  # the damping in float32, on a copy, then widened
    ref[dead, dead] = 1.0
    idx = torch.arange(12)
    ref[idx, idx] += 0.01 * torch.mean(torch.diag(ref))
    out = damped_hessian(H, dead, 0.01)
    assert out.dtype == torch.float64 and torch.equal(out, ref.to(torch.float64))
    H64 = H.double()  # already the result's dtype: still a new matrix, the caller's left as it was
    before = H64.clone()
    out64 = damped_hessian(H64, dead, 0.01)
    assert torch.equal(H64, before) and out64.data_ptr() != H64.data_ptr()


def test_damping_retries_on_singular_hessian():
    # Rank-1 Hessian with zero damping cannot be factored; the retry must raise the damping.
    v = torch.randn(8, 1)
    H = v @ v.t()
    prep = prepare_hessian(H, torch.randn(3, 8), percdamp=0.0)
    assert prep.percdamp > 0
    assert torch.isfinite(prep.U).all()


def test_non_finite_hessian_is_a_clear_error():
    H = _spd(4)
    H[0, 1] = float("inf")
    with pytest.raises(QuantizationError, match="non-finite"):
        prepare_hessian(H, torch.randn(2, 4))


def _sign_block(Wb, Ub, start):
    return binarize(Wb, torch.ones_like(Wb, dtype=torch.bool), 1)


def test_identity_hessian_equals_direct_blockwise_quantization():
    # With H = I there is nothing to compensate: OBC must equal quantizing each block directly.
    W = torch.randn(12, 40)
    prep = prepare_hessian(torch.eye(40), W.clone(), 0.01)
    Q = obc_quantize(W.clone(), prep.U, 16, _sign_block)
    direct = torch.cat([_sign_block(W[:, s:s + 16], None, s) for s in range(0, 40, 16)], dim=1)
    torch.testing.assert_close(Q, direct)


def test_compensation_lowers_output_error_on_correlated_inputs():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 4, generator=g)
    X = base @ torch.randn(4, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)  # strongly correlated
    H = 2 / 512 * X.t() @ X
    W = torch.randn(16, 64, generator=g)
    prep = prepare_hessian(H, W.clone(), 0.01)
    Q_obc = obc_quantize(W.clone(), prep.U, 16, _sign_block)
    Q_plain = torch.cat([_sign_block(W[:, s:s + 16], None, s) for s in range(0, 64, 16)], dim=1)
    assert hessian_error(W, Q_obc, H)[0] < 0.8 * hessian_error(W, Q_plain, H)[0]


def test_callback_may_return_its_own_error():
    W = torch.randn(4, 8)
    U = torch.eye(8)
    seen = []

    def cb(Wb, Ub, start):
        seen.append((start, Wb.clone()))
        return torch.zeros_like(Wb), torch.zeros_like(Wb)  # zero error: nothing propagates

    W0 = W.clone()
    Q = obc_quantize(W, U + torch.triu(torch.ones(8, 8), 1), 4, cb)
    assert [st for st, _ in seen] == [0, 4]
    assert torch.equal(seen[1][1], W0[:, 4:])  # the second block arrived uncompensated
    assert Q is W and torch.equal(Q, torch.zeros(4, 8))  # the quantized values, in W's own storage


def test_last_user_of_a_hessian_gets_its_factor_handed_over_not_kept():
    H = _spd(16)
    kept = prepare_hessian(H, torch.randn(4, 16), 0.01)  # q: kept for k and v
    assert obc._MEMO._prep is kept
    with obc.last_use_of_factor():  # v, the last: the memo lets go, the caller holds the only reference
        last = prepare_hessian(H, torch.randn(4, 16), 0.01)
    assert last is kept and obc._MEMO._prep is None
    with obc.last_use_of_factor():  # a Hessian no one shares: factored, never stored
        alone = prepare_hessian(_spd(16, seed=2), torch.randn(4, 16), 0.01)
    assert obc._MEMO._prep is None and torch.isfinite(alone.U).all()


def test_a_released_hessian_is_freed_and_its_factor_left_for_the_caller():
    H = _spd(16)
    with obc.last_use_of_factor() as last:
        prep = prepare_hessian(H, torch.randn(4, 16), 0.01, release=True)
    assert H.numel() == 0 and last.released is H and last.factor_of(H) is prep  # emptied in place: a later read fails


def test_release_frees_nothing_outside_a_last_use_or_when_not_asked():
    H, H2 = _spd(16), _spd(16, seed=1)
    prepare_hessian(H, torch.randn(4, 16), 0.01, release=True)  # a later linear may share H
    with obc.last_use_of_factor() as last:
        prepare_hessian(H2, torch.randn(4, 16), 0.01)  # the method reads H2 again (a refit)
    assert H.shape == H2.shape == (16, 16) and last.factor is None


@pytest.mark.parametrize("cols,rows", [(64, 5), (300, 40)])
def test_output_error_from_the_factor_equals_the_product_with_h(cols, rows):
    g = torch.Generator().manual_seed(cols)
    X = torch.randn(4 * cols, cols, generator=g) * torch.linspace(0.1, 3.0, cols)
    X[:, :3] = 0  # three dead columns: H is zero there, the damped H is not
    H = 2 / X.shape[0] * X.t() @ X
    W = torch.randn(rows, cols, generator=g)
    prep = prepare_hessian(H, W, 0.01)
    Q = W + 0.05 * torch.randn(rows, cols, generator=g)
    Q[:, :3] = 1.0  # whatever a method stores on a dead column costs nothing
    from_h = output_error(W, Q, H, rows=16)
    assert output_error(W, Q, factor=prep, rows=16) == pytest.approx(from_h, rel=1e-5)
    assert from_h == pytest.approx(float(torch.sum(((W - Q) @ H) * (W - Q))), rel=1e-5)
    with pytest.raises(ValueError, match="either H or its factor"):
        output_error(W, Q, H, factor=prep)


@pytest.mark.parametrize("cols,tile", [(600, 256), (300, 128), (64, 256)])
def test_accumulation_equals_full_product_and_is_exactly_symmetric(cols, tile):
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 7, cols, generator=g) for _ in range(3)]
    acc = HessianAccumulator(cols, tile=tile)
    for x in xs:
        acc.add_batch(x)
    X = torch.cat([x.reshape(-1, cols) for x in xs])
    H = acc.H
    torch.testing.assert_close(H, 2 / 6 * X.t() @ X, rtol=1e-4, atol=1e-4)
    assert torch.equal(H, H.t())


def test_hessian_that_stays_singular_after_retries_is_a_clear_error(monkeypatch):
    # Force every factorisation to fail: the error must say damping was raised and still failed.
    def never(*a, out=None, **k):
        if out is not None:  # the in-place form (on the CPU) reports through its out= info
            out[1].fill_(1)
            return out
        return torch.zeros(4, 4), torch.tensor(1)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", never)
    with pytest.raises(QuantizationError, match=r"could not be factored even with percdamp=.*6 tries"):
        prepare_hessian(_spd(4), torch.randn(2, 4), percdamp=0.01)


def test_the_loop_hands_freed_memory_back_every_few_blocks_on_the_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(obc, "return_freed_memory", lambda: calls.append(1))
    W = torch.randn(3, 36)
    U = prepare_hessian(_spd(36), W, 0.01).U
    Q = obc_quantize(W.clone(), U, 4, _sign_block)  # 9 blocks: handed back before the 5th and the 9th
    assert len(calls) == 2 == (9 - 1) // obc._TRIM_EVERY
    monkeypatch.setattr(obc, "_TRIM_EVERY", 10**9)
    assert torch.equal(Q, obc_quantize(W.clone(), U, 4, _sign_block)) and len(calls) == 2  # values do not depend on it
