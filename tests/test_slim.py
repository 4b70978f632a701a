"""SliM-LLM: salience-determined bit allocation, salience-weighted calibration, GPTQ loop, packing."""

import pytest
import torch

import billm
from billm.compare import parse_method
from billm import GPTQConfig, SliMConfig
from billm.errors import BillmError
from billm.methods import get_method
from billm.methods.gptq import GridColumns, gptq_weight
from billm.methods.obc import hessian_error, prepare_hessian
from billm.methods.rtn import minmax_params, quantize_minmax
from billm.methods.slim import (allocation_candidates, allocation_errors, diag_allocation_errors, group_salience,
                                group_sizes, local_weights, lowered_groups, make_calibrate, salience_allocation, sqc_params,
                                weighted_error)

from conftest import random_problem, real_layer, tiny_model


# ----------------------------------------------------------------------------- allocation


@pytest.mark.parametrize("cols,groupsize,bits", [(1000, 64, 2), (576, 128, 2), (512, 128, 3), (130, 16, 4), (40, 64, 2)])
def test_every_candidate_keeps_the_average_exactly(cols, groupsize, bits):
    sizes = group_sizes(cols, groupsize)
    assert sum(sizes) == cols
    sal = torch.rand(len(sizes), generator=torch.Generator().manual_seed(cols))
    cands = allocation_candidates(sal, sizes, groupsize, bits)
    assert cands[0] == [bits] * len(sizes)
    assert len(cands) == 1 + sum(n == groupsize for n in sizes) // 2  # distinct saliences: every pair admissible
    for k, gb in enumerate(cands):
        assert sum(n * b for n, b in zip(sizes, gb)) == bits * cols  # exact, in integers
        assert set(gb) <= {bits - 1, bits, bits + 1}
        assert gb.count(bits + 1) == gb.count(bits - 1) == k
        if sizes[-1] != groupsize:
            assert gb[-1] == bits  # the partial group never moves


def test_bits_flow_from_the_least_to_the_most_salient_groups():
    sal = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.5])
    cands = allocation_candidates(sal, [8] * 6, 8, 2)
    assert cands[1] == [2, 2, 3, 2, 2, 1]
    assert cands[2] == [3 if s in (9.0, 7.0) else 1 if s in (1.0, 0.5) else 2 for s in sal.tolist()]


@pytest.mark.parametrize("cols,average,expected", [(576, 1.9, 1), (576, 1.5, 3), (1536, 1.9, 2), (1536, 1.5, 6),
                                                    (1536, 1.75, 3), (256, 1.01, 2), (576, 0.0, 0)])
def test_lowered_groups_are_the_fewest_that_reach_the_average(cols, average, expected):
    sizes = group_sizes(cols, 128)
    n = lowered_groups(sizes, 128, 2, average)
    assert n == expected
    if average:
        assert (2 * cols - n * 128) / cols <= average + 1e-12  # reached...
        assert n == 0 or (2 * cols - (n - 1) * 128) / cols > average  # ...by the fewest groups


def test_a_fractional_average_lowers_the_least_salient_groups_in_every_candidate():
    sal = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.5, 4.0, 6.0])
    cands = allocation_candidates(sal, [8] * 8, 8, 2, lowered=2)
    assert cands[0] == [2, 1, 2, 2, 2, 1, 2, 2]  # saliences 1.0 and 0.5 at bits - 1
    assert cands[1] == [2, 1, 3, 1, 2, 1, 2, 2]  # then the pairs among the rest: 9.0 up, 3.0 down
    for gb in cands:
        assert sum(gb) == 2 * 8 - 2 and gb[1] == gb[5] == 1


def test_a_fractional_average_is_stored_and_reported_honestly(shared_data):
    W, H = real_layer(shared_data, "q_proj")
    res = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=2, average=1.5))
    gb = res.info["group_bits"]
    width = sum(n * b for n, b in zip(group_sizes(W.shape[1], 128), gb)) / W.shape[1]
    assert width <= 1.5 and res.stored.weight_bits == pytest.approx(width) and res.weight_bits == pytest.approx(width)
    plain = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=2))
    assert hessian_error(W, res.q, H)[1] > hessian_error(W, plain.q, H)[1]  # fewer bits cost error, not silently nothing


def test_uniform_salience_moves_no_bits():
    assert allocation_candidates(torch.full((8,), 2.5), [16] * 8, 16, 2) == [[2] * 8]
    # two tied groups in the middle stop the search before bits would move between equals
    assert len(allocation_candidates(torch.tensor([4.0, 2.0, 2.0, 1.0]), [16] * 4, 16, 2)) == 2


def test_group_salience_sums_the_hessian_metric():
    W, H = random_problem(6, 40)
    d = torch.diag(prepare_hessian(H, W.clone()).U)
    s = group_salience(W, d, 16)
    full = W**2 / d**2
    assert torch.allclose(s, torch.stack([full[:, :16].sum(), full[:, 16:32].sum(), full[:, 32:].sum()]))


def test_incremental_errors_equal_direct_computation():
    W, H = random_problem(24, 96, outlier_cols=(3, 50))
    sal = torch.rand(6, generator=torch.Generator().manual_seed(1))
    cands = allocation_candidates(sal, [16] * 6, 16, 2)

    def rnd(w, b, col):
        return quantize_minmax(w, *minmax_params(w, b), b)

    errs = allocation_errors(W, H, cands, 16, rnd)
    for gb, e in zip(cands, errs):
        Q = torch.cat([rnd(W[:, 16 * g:16 * g + 16], b, 16 * g) for g, b in enumerate(gb)], dim=1)
        assert e == pytest.approx(hessian_error(W, Q, H)[0], rel=1e-4)


def test_diag_errors_are_gptqs_per_column_loss():
    W, H = random_problem(12, 64)
    d = torch.diag(prepare_hessian(H, W.clone()).U)
    cands = allocation_candidates(torch.arange(4.0), [16] * 4, 16, 3)

    def rnd(w, b, col):
        return quantize_minmax(w, *minmax_params(w, b), b)

    errs = diag_allocation_errors(W, d, cands, 16, rnd)
    for gb, e in zip(cands, errs):
        Q = torch.cat([rnd(W[:, 16 * g:16 * g + 16], b, 16 * g) for g, b in enumerate(gb)], dim=1)
        assert e == pytest.approx(float((((W - Q) / d) ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("proxy", ["diag", "output"])
def test_sba_lowers_the_real_output_error_with_either_proxy(shared_data, proxy):
    W, H = real_layer(shared_data, "down_proj")
    base = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=3, sba=False)).q
    res = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=3, sba_error=proxy))
    assert hessian_error(W, res.q, H)[0] <= hessian_error(W, base, H)[0]
    if proxy == "diag":  # GPTQ's own loss sees what the rounded-output proxy misses on this layer
        assert res.info["sba_moved"] > 0 and hessian_error(W, res.q, H)[0] < 0.9 * hessian_error(W, base, H)[0]


def test_sba_picks_the_least_error_and_mixed_precision_helps_on_salient_channels(shared_data):
    W, H = real_layer(shared_data)
    cfg = SliMConfig(bits=2, groupsize=128)
    U = prepare_hessian(H, W.clone()).U
    alloc = salience_allocation(W, H, torch.diag(U), cfg, make_calibrate(torch.diag(U), cfg, torch.float16))
    assert alloc.errors[alloc.moved] == min(alloc.errors)
    assert alloc.moved > 0 and alloc.errors[alloc.moved] < alloc.errors[0]  # a real layer has salient groups


# ----------------------------------------------------------------------------- SQC


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", range(4))
def test_sqc_never_increases_the_weighted_error(bits, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 128, generator=g) * torch.rand(32, 1, generator=g)
    w[:, :3] *= 6  # a few large weights per row
    omega = local_weights(w**2, tau=2.0)
    base = weighted_error(w, quantize_minmax(w, *minmax_params(w, bits, torch.float16), bits), omega)
    s, z = sqc_params(w, omega, bits, torch.float16, steps=20, max_shrink=0.5)
    found = weighted_error(w, quantize_minmax(w, s, z, bits), omega)
    assert (found <= base).all()
    assert (found < base).any()  # and clipping does pay somewhere
    for shrink in (0.9, 0.7, 0.5):  # no coarser candidate on its grid beats it
        lo, hi = w.min(1, keepdim=True).values * shrink, w.max(1, keepdim=True).values * shrink
        from billm.methods.rtn import range_params

        other = weighted_error(w, quantize_minmax(w, *range_params(lo, hi, bits, torch.float16), bits), omega)
        assert (found <= other + 1e-6).all()


def test_local_weights_mark_outliers_only():
    delta = torch.ones(2, 64)
    assert torch.equal(local_weights(delta, 1.0), torch.ones(2, 64))  # uniform salience: plain error
    delta[0, 5] = 100.0
    om = local_weights(delta, 1.5)
    assert om[0, 5] == 2.5 and om.sum() == 128 + 1.5


# ----------------------------------------------------------------------------- the method


def test_without_sba_and_sqc_it_is_gptq_with_groups():
    W, H = random_problem(16, 96)
    slim = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=3, groupsize=32, blocksize=32, sba=False, sqc=False))
    gptq = get_method("gptq")(W.clone(), H.clone(), GPTQConfig(bits=3, groupsize=32, blocksize=32))
    assert torch.equal(slim.q, gptq.q)
    assert slim.info["group_bits"] == [3, 3, 3] and slim.weight_bits == 3.0


def test_uniform_salience_reduces_to_plain_gptq():
    """Weights of one magnitude and a diagonal H with equal entries: every weight equally salient.

    SBA then keeps every group at the target width, and SQC's weights are all 1: SliM is GPTQ whose
    group ranges minimise the plain squared error (and, with SQC off, GPTQ bit for bit).
    """
    g = torch.Generator().manual_seed(0)
    W = torch.where(torch.rand(8, 64, generator=g) > 0.5, 0.3, -0.3)
    H = torch.eye(64) * 2.0
    gcfg = GPTQConfig(bits=2, groupsize=16, blocksize=32)
    slim = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=2, groupsize=16, blocksize=32))
    assert slim.info["group_bits"] == [2] * 4 and slim.info["sba_moved"] == 0
    assert torch.equal(local_weights(W**2, 1.0), torch.ones_like(W))

    def plain_mse(W0, U):
        cal = lambda w, b, col: sqc_params(w, torch.ones_like(w), b, torch.float16, 20, 0.5)  # noqa: E731
        return GridColumns(W0, 2, 16, torch.float16, calibrate=cal)

    assert torch.equal(slim.q, gptq_weight(W.clone(), H.clone(), 32, 0.01, plain_mse).q)
    nosqc = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=2, groupsize=16, blocksize=32, sqc=False))
    assert torch.equal(nosqc.q, get_method("gptq")(W.clone(), H.clone(), gcfg).q)


@pytest.mark.parametrize("bits", [2, 3])
def test_slim_beats_gptq_at_the_same_storage_on_a_real_layer(shared_data, bits):
    W, H = real_layer(shared_data)
    cfg = SliMConfig(bits=bits, groupsize=128)
    slim = get_method("slim")(W.clone(), H.clone(), cfg)
    gcfg = GPTQConfig(bits=bits, groupsize=128)
    gptq = get_method("gptq")(W.clone(), H.clone(), gcfg)
    assert slim.weight_bits == bits
    sb_slim, sb_gptq = slim.stored.storage_bits, gptq.stored.storage_bits  # from the packed bytes
    # zeros at the widest width: one more zero-point plane (a padded byte a row), and the width map (a byte a group)
    rows, cols = W.shape
    assert sb_slim - sb_gptq == pytest.approx((8 * rows + 8 * -(-cols // 128)) / (rows * cols))
    assert hessian_error(W, slim.q, H)[0] < hessian_error(W, gptq.q, H)[0]


def test_each_part_helps_on_a_real_layer(shared_data):
    W, H = real_layer(shared_data)
    err = {}
    for name, kw in {"gptq": dict(sba=False, sqc=False), "sqc": dict(sba=False), "both": {}}.items():
        q = get_method("slim")(W.clone(), H.clone(), SliMConfig(bits=2, **kw)).q
        err[name] = hessian_error(W, q, H)[0]
    assert err["both"] < err["sqc"] < err["gptq"]


def test_config_validation_and_spec():
    with pytest.raises(BillmError, match="2..7"):
        SliMConfig(bits=1)
    with pytest.raises(BillmError, match="groupsize"):
        SliMConfig(groupsize=-1)
    assert parse_method("slim:w3") == SliMConfig(bits=3)
    assert parse_method("slim:w2g64") == SliMConfig(bits=2, groupsize=64)
    assert parse_method("slim:w2+nosqc") == SliMConfig(bits=2, sqc=False)
    assert parse_method("slim:w2+nosba") == SliMConfig(bits=2, sba=False)
    assert parse_method("slim:w3+output") == SliMConfig(bits=3, sba_error="output")
    with pytest.raises(BillmError, match="sba_error"):
        SliMConfig(sba_error="kl")
    assert parse_method("slim:w2+average=1.8") == SliMConfig(bits=2, average=1.8)
    for bad in (2.0, 1.0, 2.5):
        with pytest.raises(BillmError, match="average"):
            SliMConfig(bits=2, average=bad)
    with pytest.raises(BillmError, match="sba"):
        SliMConfig(bits=2, average=1.8, sba=False)
    assert "average" not in SliMConfig(bits=2).to_dict()  # records of configs without it are unchanged
    with pytest.raises(BillmError, match="slim"):
        parse_method("slim:w2+fast")
    assert billm.config_from_dict(SliMConfig(bits=3, tau=2.0).to_dict()) == SliMConfig(bits=3, tau=2.0)


def test_slim_checkpoint_round_trip_and_report(tmp_path):
    model = tiny_model("llama", 0)
    calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = billm.quantize(model, calib, SliMConfig(bits=2, groupsize=16), progress=False)
    for layer in rep.layers:
        gb = layer.info["group_bits"]
        assert sum(gb) == 2 * len(gb) and layer.weight_bits == 2.0
    assert all(l.info["sba_error_ratio"] is None or l.info["sba_error_ratio"] <= 1 for l in rep.layers)
    ids = torch.randint(3, 120, (2, 16))
    billm.set_kernel(model, "dequant")  # exact; the lookup path agrees to float rounding
    with torch.no_grad():
        before = model(ids).logits
    billm.save(model, tmp_path / "ck", report=rep)
    loaded = billm.load(tmp_path / "ck")
    with torch.no_grad():
        billm.set_kernel(loaded, "dequant")  # exact; the lookup path agrees to float rounding
        assert torch.equal(loaded(ids).logits, before)
        billm.set_kernel(loaded, "lut")
        assert torch.allclose(loaded(ids).logits, before, rtol=1e-4, atol=1e-4)
    info = billm.inspect_checkpoint(tmp_path / "ck")
    assert info.storage_bits == pytest.approx(rep.storage_bits)  # both from the packed bytes
    assert info.bytes_by_kind()["in the map"] == sum(len(l.info["group_bits"]) for l in rep.layers)


def test_a_corrupt_width_map_is_a_checkpoint_error(tmp_path):
    import json

    model = tiny_model("llama", 0)
    rep = billm.quantize(model, torch.randint(3, 120, (2, 32)), SliMConfig(bits=2, groupsize=16), progress=False)
    billm.save(model, tmp_path / "ck", report=rep)
    qf = tmp_path / "ck" / "billm_quant.json"
    q = json.loads(qf.read_text())
    name = next(iter(q["layers"]))
    q["layers"][name]["meta"]["group_bits"] = [2, 2]
    qf.write_text(json.dumps(q))
    with pytest.raises(billm.CheckpointError, match=f"layer {name} has invalid attributes.*group_bits"):
        billm.load(tmp_path / "ck")
