"""RTN, GPTQ and plain sign binarization on the shared OBC loop."""

import pytest
import torch

import billm
from billm import config_from_dict
from billm import GPTQConfig, PBLLMConfig, RTNConfig, SignConfig
from billm.methods import get_method
from billm.methods.obc import hessian_error
from billm.methods.rtn import rtn

from conftest import random_problem, real_layer, tiny_model


@pytest.mark.parametrize("bits,groupsize", [(2, -1), (3, 16), (4, 32), (8, -1)])
def test_rtn_levels_and_range(bits, groupsize):
    W = torch.randn(12, 64)
    Q = rtn(W, bits, groupsize)
    gs = 64 if groupsize == -1 else groupsize
    for r in range(12):
        for st in range(0, 64, gs):
            assert len(torch.unique(Q[r, st:st + gs])) <= 2**bits
    assert (Q - W).abs().max() <= (W.max() - W.min()) / (2**bits - 1)  # within one step


def test_gptq_with_identity_hessian_equals_rtn():
    W = torch.randn(16, 96)
    res = get_method("gptq")(W.clone(), torch.eye(96), GPTQConfig(bits=3, blocksize=32))
    assert torch.equal(res.q, rtn(W, 3, scale_dtype=torch.float16))  # the same fp16-rounded grid


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_a_real_hessian(shared_data, bits):
    W, H = real_layer(shared_data)
    q_rtn = rtn(W, bits)
    q_gptq = get_method("gptq")(W.clone(), H.clone(), GPTQConfig(bits=bits)).q
    assert hessian_error(W, q_gptq, H)[0] < 0.8 * hessian_error(W, q_rtn, H)[0]


def test_gptq_act_order_and_groups_run_and_stay_on_the_grid(shared_data):
    W, H = real_layer(shared_data)
    q = get_method("gptq")(W.clone(), H.clone(), GPTQConfig(bits=2, groupsize=128, act_order=True)).q
    assert q.shape == W.shape and torch.isfinite(q).all()
    assert hessian_error(W, q, H)[1] < hessian_error(W, rtn(W, 2, 128), H)[1]


@pytest.mark.parametrize("method,cfg", [("rtn", RTNConfig(bits=8)), ("gptq", GPTQConfig(bits=8))])
def test_eight_bits_is_near_lossless(shared_data, method, cfg):
    W, H = real_layer(shared_data)
    q = get_method(method)(W.clone(), H.clone(), cfg).q
    assert hessian_error(W, q, H)[1] < 1e-3


@pytest.mark.parametrize("centred", [False, True])
def test_sign_is_one_bit_per_weight_and_compensation_helps(shared_data, centred):
    W, H = real_layer(shared_data)
    plain = get_method("sign")(W.clone(), None, SignConfig(obc=False, centred=centred)).q
    comp = get_method("sign")(W.clone(), H.clone(), SignConfig(obc=True, centred=centred)).q
    for q in (plain, comp):
        assert max(len(torch.unique(row)) for row in q) <= 2
    assert hessian_error(W, comp, H)[0] < hessian_error(W, plain, H)[0]


@pytest.mark.parametrize("cfg", [RTNConfig(bits=4, groupsize=32), GPTQConfig(bits=3), SignConfig(), PBLLMConfig()])
def test_baselines_quantize_a_tiny_model(cfg):
    model = tiny_model("qwen2")
    ids = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = billm.quantize(model, ids, cfg, progress=False)
    expected = 8 * 0.1 + 0.9 if isinstance(cfg, PBLLMConfig) else getattr(cfg, "bits", 1)
    assert len(rep.layers) == 14 and rep.weight_bits == pytest.approx(expected, abs=1e-3)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert config_from_dict(cfg.to_dict()) == cfg


def test_invalid_baseline_options():
    with pytest.raises(billm.BillmError):
        RTNConfig(bits=9)
    with pytest.raises(billm.BillmError):
        GPTQConfig(groupsize=0)


@pytest.mark.parametrize("fraction", [0.1, 0.05])
def test_pbllm_keeps_exactly_the_requested_fraction(shared_data, fraction):
    from billm import PBLLMConfig

    W, H = real_layer(shared_data)
    res = get_method("pbllm")(W.clone(), H.clone(), PBLLMConfig(salient_fraction=fraction))
    blocks = [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert res.info["salient_weights"] == sum(round(fraction * 576 * (b - a)) for a, b in blocks)
    assert res.weight_bits == pytest.approx(8 * res.info["salient_weights"] / W.numel() + 1 - res.info["salient_weights"] / W.numel())
    # better than plain 1-bit, worse than nothing
    sign = get_method("sign")(W.clone(), H.clone(), SignConfig()).q
    assert hessian_error(W, res.q, H)[0] < hessian_error(W, sign, H)[0]


def test_storage_bits_are_the_packed_bytes():
    W, H = random_problem(10, 256)
    g = get_method("gptq")(W.clone(), H.clone(), GPTQConfig(bits=2, groupsize=128))
    # codes: 2 planes x 10 rows x 32 bytes; scales 10 x 2 fp16; zeros: 2 planes x 10 rows x 1 byte
    assert g.stored.storage_bits == (2 * 10 * 32 + 10 * 2 * 2 + 2 * 10 * 1) * 8 / (10 * 256)
    s = get_method("sign")(W[:8, :64].clone(), None, SignConfig(obc=False))
    assert s.stored.storage_bits == 1 + 16 / 64  # a sign bit a weight and an fp16 scale a row
    b = get_method("billm")(W[:4, :128].clone(), H[:128, :128].clone(), billm.BiLLMConfig())
    k = b.info["salient_cols"]
    # 4 rows: signs 16 B each plane, 2nd signs ceil(k/8) B, group bitmap ceil((128-k)/8) B, 16 B column mask, 4x4 fp16
    assert b.stored.storage_bits == (4 * 16 + 4 * -(-k // 8) + 4 * -(-(128 - k) // 8) + 16 + 4 * 4 * 2) * 8 / 512


def test_report_has_storage_bits_above_weight_bits():
    model = tiny_model("llama")
    rep = billm.quantize(model, torch.randint(3, 128, (2, 16)), billm.BiLLMConfig(), progress=False)
    assert rep.storage_bits > rep.weight_bits + 0.5  # fp16 scales per 128-column block are not free
