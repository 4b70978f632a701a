"""Incoherence processing (``rotate=hadamard``): the transform, the rotated layer, the checkpoint round trips,
the bytes counted, and no change at all for ``rotate=none``."""

import argparse
import json

import pytest
import torch

import billm
from billm.packing.checkpoint import inspect
from billm import BiLLMConfig, GPTQConfig, RTNConfig
from billm.kernels.bitpack import packed_len
from billm.kernels.hadamard import fwht, hadamard_block, hadamard_matrix, random_signs, rotate, rotate_hessian, unrotate
from billm.methods import config_from_spec, get_method
from billm.packing.formats import ROTATION_FIELD
from billm.packing.linear import PackedLinear
from billm.packing.rotation import Rotation

WIDTHS = [1, 8, 64, 24, 48, 576, 1536, 7]  # powers of two, the block rule (576 = 64*9, 1536 = 512*3), odd


def _explicit_R(n: int, seed: int = 0) -> torch.Tensor:
    """(n, n) float64 D @ blockdiag(H_b, ..., H_b), built from the definition."""
    b = hadamard_block(n)
    d = torch.where(random_signs(n, seed), 1.0, -1.0).double()
    return torch.diag(d) @ torch.block_diag(*[hadamard_matrix(b)] * (n // b))


def test_the_block_rule():
    assert [hadamard_block(n) for n in (576, 1536, 4096, 11008, 24, 7, 1)] == [64, 512, 4096, 256, 8, 1, 1]
    with pytest.raises(ValueError):
        fwht(torch.zeros(2, 24), 16)  # 16 does not divide 24


@pytest.mark.parametrize("n", WIDTHS)
def test_fwht_equals_the_hadamard_matrix_product(n):
    b = hadamard_block(n)
    x = torch.randn(2, 3, n, dtype=torch.float64)  # any batch shape
    full = torch.block_diag(*[hadamard_matrix(b)] * (n // b))
    torch.testing.assert_close(fwht(x, b), x @ full, rtol=0, atol=1e-12)
    x32 = x.float()
    assert fwht(x32, b).dtype == torch.float32
    torch.testing.assert_close(fwht(x32, b), (x @ full).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", WIDTHS)
def test_R_is_orthogonal_and_rotate_applies_it(n):
    R = _explicit_R(n)
    torch.testing.assert_close(R @ R.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    d = torch.where(random_signs(n, 0), 1.0, -1.0).double()
    b = hadamard_block(n)
    x = torch.randn(5, n, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, d, b), x @ R, rtol=0, atol=1e-12)
    torch.testing.assert_close(unrotate(rotate(x, d, b), d, b), x, rtol=0, atol=1e-12)
    H = x.T @ x
    torch.testing.assert_close(rotate_hessian(H, d, b), R.T @ H @ R, rtol=0, atol=1e-10)
    # the invariance the method relies on: x W^T = (x R)(W R)^T
    W = torch.randn(4, n, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, d, b) @ rotate(W, d, b).T, x @ W.T, rtol=0, atol=1e-10)


def test_half_precision_inputs_keep_their_dtype():
    d = torch.where(random_signs(576, 0), 1.0, -1.0)
    x = torch.randn(3, 576)
    for dt in (torch.float16, torch.bfloat16):
        y = rotate(x.to(dt), d, 64)
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), rotate(x.to(dt).float(), d, 64), rtol=1e-2, atol=1e-2)


def test_signs_depend_on_seed_and_width_only():
    assert torch.equal(random_signs(576, 3), random_signs(576, 3))
    assert not torch.equal(random_signs(576, 3), random_signs(576, 4))
    assert Rotation.make("none", 576, 0) is None


CONFIGS = {"rtn": RTNConfig(bits=3, groupsize=16), "gptq": GPTQConfig(bits=2, groupsize=16, blocksize=16),
           "billm": BiLLMConfig(blocksize=16)}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("kernel", ["dequant", "lut"])
def test_rotated_packed_linear_equals_the_unrotated_weight(method, kernel, random_problem):
    rows, cols = 32, 48  # 48 = 16 * 3: blocks of 16
    W, H = random_problem(rows, cols, seed=1)
    cfg = CONFIGS[method].replace(rotate="hadamard")
    rot = Rotation.make("hadamard", cols, 0)
    m = get_method(method)
    res = m(rot.weight(W), rot.hessian(H) if cfg.uses_hessian else None, cfg)
    st = rot.attach(res.stored)
    bias = torch.randn(rows)
    layer = PackedLinear.from_stored(st, bias)
    layer.kernel = kernel
    W_eff = (st.decode().double() @ _explicit_R(cols).T).float()  # W_hat R^T in the input's own basis
    torch.testing.assert_close(layer.weight, W_eff, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 5, cols)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ W_eff.T + bias, rtol=1e-4, atol=1e-4)
    # the sign vector is a packed field: counted in the bytes and the storage bits
    assert st.tensors[ROTATION_FIELD].shape == (packed_len(cols),)
    assert st.nbytes == res.stored.nbytes + packed_len(cols)
    assert st.storage_bits == pytest.approx(res.stored.storage_bits + packed_len(cols) * 8 / (rows * cols))
    assert st.weight_bits == res.stored.weight_bits


def _model(tiny_config, hidden=48, inter=96):
    """A tiny LLaMA whose in-widths (48 = 16*3, 96 = 32*3) are not powers of two."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = hidden, inter, hidden // cfg.num_attention_heads
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


CALIB = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(1))


def _logits(model):
    billm.set_kernel(model, "dequant")
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_rotated_model_saves_and_loads_exactly(method, tiny_config, tmp_path):
    from transformers import AutoModelForCausalLM

    model = _model(tiny_config)
    with torch.no_grad():
        ref = model(IDS).logits
    cfg = CONFIGS[method].replace(rotate="hadamard", rotate_seed=5)
    report = billm.quantize(model, CALIB, cfg, progress=False)
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.rotation() is not None for m in layers)
    assert {m.meta["rotate_block"] for m in layers} == {16, 32}
    out = _logits(model)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    folder = billm.save(model, tmp_path / "ck", report=report)
    assert torch.equal(_logits(billm.load(folder)), out)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(folder)), out)
    qmap = json.loads((folder / "billm_quant.json").read_text())
    assert qmap["config"]["rotate"] == "hadamard" and qmap["config"]["rotate_seed"] == 5
    # storage bits from the file's bytes count the sign vectors, and agree with the report
    info = inspect(folder)
    assert info.bytes_by_kind()["rotation signs"] == sum(packed_len(m.in_features) for m in layers)
    assert info.storage_bits == pytest.approx(report.storage_bits)
    # the errors are reported in the rotated basis, which the orthogonal R leaves unchanged
    assert all(0 < r.weight_rel_err < 1.5 for r in report.layers)


def test_rotated_model_resumes_from_its_progress(tiny_config, tmp_path):
    from billm.resume import ProgressStore

    cfg = GPTQConfig(bits=2, groupsize=16, blocksize=16, rotate="hadamard")
    a = _model(tiny_config)
    billm.quantize(a, CALIB, cfg, progress=False, store=ProgressStore(tmp_path / "p", {"run": 1}))
    b = _model(tiny_config)
    billm.quantize(b, CALIB, cfg, progress=False, store=ProgressStore(tmp_path / "p", {"run": 1}))  # all replayed
    assert torch.equal(_logits(a), _logits(b))


def test_rotation_reaches_the_config_from_specs_flags_and_dicts():
    from billm.cli import add_config_options, config_from_args

    assert config_from_spec("gptq:w2g128+hadamard") == GPTQConfig(bits=2, groupsize=128, rotate="hadamard")
    assert config_from_spec("billm:plus+hadamard+rotate_seed=3").rotate_seed == 3
    assert config_from_spec("rtn:rotate=hadamard").rotate == "hadamard"
    p = argparse.ArgumentParser()
    add_config_options(p)
    cfg = config_from_args(p.parse_args(["--method", "gptq", "--rotate", "hadamard", "--rotate-seed", "2"]))
    assert (cfg.rotate, cfg.rotate_seed) == ("hadamard", 2)
    with pytest.raises(SystemExit):
        p.parse_args(["--rotate", "random"])
    with pytest.raises(billm.BillmError):
        GPTQConfig(rotate="random")
    d = GPTQConfig(rotate="hadamard", rotate_seed=1).to_dict()
    assert billm.config_from_dict(json.loads(json.dumps(d))) == GPTQConfig(rotate="hadamard", rotate_seed=1)


def test_rotate_none_writes_what_billm_wrote_before(tiny_config, tmp_path):
    # rotate=none (the default) is recorded nowhere: the config records, the map and the tensors are those of a
    # billm without rotation (byte identity against the commit before it was checked by hand, see the commit message)
    d = GPTQConfig().to_dict()
    assert "rotate" not in d and "rotate_seed" not in d
    assert GPTQConfig.from_dict(d) == GPTQConfig()
    model = _model(tiny_config)
    folder = billm.save(model, tmp_path / "ck", report=billm.quantize(model, CALIB, GPTQConfig(bits=2), progress=False))
    for name in ("billm_quant.json", "config.json", "billm_report.json"):
        assert "rotat" not in (folder / name).read_text()
    assert all(m.rotation() is None for m in model.modules() if isinstance(m, PackedLinear))
