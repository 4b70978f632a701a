import pytest
import torch

from billm import BiLLMConfig
from billm.methods.binarize import binarize, binarize_params, sign_pm1, sq_error


def _mask(rows, cols, p=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g) < p


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("centred", [True, False])
def test_values_per_row_and_zero_off_mask(order, centred):
    x = torch.randn(16, 40, dtype=torch.float64)
    m = _mask(16, 40)
    b = binarize(x, m, order, centred)
    assert torch.all(b[~m] == 0)
    for r in range(16):
        assert len(torch.unique(b[r][m[r]])) <= 2**order


def test_order1_matches_closed_form():
    x = torch.randn(8, 30, dtype=torch.float64)
    m = _mask(8, 30, 0.6, seed=1)
    b = binarize(x, m, 1, centred=True)
    for r in range(8):
        v = x[r][m[r]]
        mu = v.mean()
        alpha = (v - mu).abs().mean()
        expect = alpha * torch.where(v - mu >= 0, 1.0, -1.0).double() + mu
        torch.testing.assert_close(b[r][m[r]], expect)


def test_uncentred_is_plain_sign_times_mean_abs():
    x = torch.randn(4, 20, dtype=torch.float64)
    m = torch.ones(4, 20, dtype=torch.bool)
    b = binarize(x, m, 1, centred=False)
    torch.testing.assert_close(b, x.abs().mean(1, keepdim=True) * sign_pm1(x))


def test_empty_row_gives_zero_and_sign_of_zero_is_plus_one():
    x = torch.randn(3, 5)
    m = torch.ones(3, 5, dtype=torch.bool)
    m[1] = False
    assert torch.all(binarize(x, m, 2)[1] == 0)
    assert sign_pm1(torch.tensor([0.0, -0.0, -1e-30, 2.0])).tolist() == [1.0, 1.0, -1.0, 1.0]


def test_higher_order_never_worse():
    x = torch.randn(32, 64, dtype=torch.float64)
    m = _mask(32, 64, 0.7, seed=2)
    e1 = sq_error(x * m, binarize(x, m, 1))
    e2 = sq_error(x * m, binarize(x, m, 2))
    e3 = sq_error(x * m, binarize(x, m, 3))
    assert e3 <= e2 <= e1
    assert e2 < 0.5 * e1  # residual binarization helps a lot on Gaussian data


@pytest.mark.parametrize("order", [1, 2])
def test_params_reconstruct(order):
    x = torch.randn(10, 25, dtype=torch.float64)
    m = _mask(10, 25, 0.5, seed=3)
    signs, alphas, mus = binarize_params(x, m, order)
    assert signs.shape == (order, 10, 25) and alphas.shape == (order, 10)
    rec = sum(alphas[k][:, None] * (2 * signs[k].double() - 1) + mus[k][:, None] for k in range(order)) * m
    torch.testing.assert_close(rec, binarize(x, m, order))


def test_column_split_stores_one_group_bit_per_column_and_keeps_groups_whole(random_problem):
    from billm.methods import get_method
    from billm.methods.billm import billm_unpack

    W, H = random_problem(24, 96, outlier_cols=(5, 40))
    per_weight = get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=32))
    per_column = get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=32, split="column"))
    st = per_column.stored
    assert torch.equal(st.decode(), per_column.q)
    k = st.meta["n_salient"]
    assert st.meta["split"] == "column" and tuple(st.tensors["group"].shape) == ((96 - k + 7) // 8,)
    assert "split" not in per_weight.stored.meta  # the default is not written: earlier maps stay byte-identical
    _, sal, sparse, _ = billm_unpack(st.tensors, st.shape, st.meta)
    assert torch.equal(sparse, sparse[:1].expand_as(sparse)) and not sparse[:, sal].any()
    assert st.storage_bits < per_weight.stored.storage_bits - 0.7
