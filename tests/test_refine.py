"""The options beyond BiLLM (methods/refine.py and the intra-block pass): refined scales, output-error refit, in-block GPTQ, the plus preset."""

import pytest
import torch

from billm.compare import parse_method
from billm import BiLLMConfig
from billm.errors import BillmError
from billm.methods import get_method
from billm.methods.binarize import binarize_params
from billm.methods.obc import hessian_error
from billm.methods.refine import group_error, refine_group, refit_scales
from billm.packing.formats import pm1


def _problem(rows=24, cols=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(3 * cols, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    return W, X.T @ X / X.shape[0]


@pytest.mark.parametrize("order,centred", [(2, False), (2, True), (1, True)])
@pytest.mark.parametrize("seed", range(4))
def test_refined_group_error_never_increases(order, centred, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 40, generator=g) * torch.rand(16, 1, generator=g)
    mask = torch.rand(16, 40, generator=g) > 0.3
    signs, alphas, mus = binarize_params(x, mask, order, centred)
    err = group_error(x, mask, signs, alphas, mus)
    for rounds in (1, 2, 4):
        s, a, m = refine_group(x, mask, signs, centred, rounds)
        new = group_error(x, mask, s, a, m)
        assert new <= err * (1 + 1e-6)
        err_prev = new
    assert err_prev <= err


def test_refit_never_increases_the_output_error_it_minimises():
    W, H = _problem()
    rows, cols = W.shape
    g = torch.Generator().manual_seed(1)
    signs = torch.rand(rows, cols, generator=g) > 0.5
    group = torch.rand(rows, cols, generator=g) > 0.5
    block_of = torch.arange(cols) // 32
    patterns = torch.stack([pm1(signs) * ~group, pm1(signs) * group])  # two slots a block
    start = torch.rand(3, 2, rows, generator=g)  # arbitrary scales: a feasible point
    Q0 = sum(start[block_of, s, :].t() * patterns[s] for s in range(2))
    fit = refit_scales(W, H, patterns, block_of, 3)
    Q1 = sum(fit[block_of, s, :].t() * patterns[s] for s in range(2))
    assert hessian_error(W, Q1, H)[0] <= hessian_error(W, Q0, H)[0]
    # and it is the optimum: perturbing any scale makes it worse
    bumped = fit.clone()
    bumped[1, 0, 5] += 1e-2
    Q2 = sum(bumped[block_of, s, :].t() * patterns[s] for s in range(2))
    assert hessian_error(W, Q2, H)[0] > hessian_error(W, Q1, H)[0]


def test_refit_in_row_chunks_equals_one_chunk():
    W, H = _problem(rows=10, cols=64)
    patterns = torch.stack([pm1(torch.rand(10, 64) > 0.5)])
    block_of = torch.arange(64) // 32
    a = refit_scales(W, H, patterns, block_of, 2)
    b = refit_scales(W, H, patterns, block_of, 2, max_bytes=8 * 2 * 64 * 3)  # 3 rows a chunk
    assert torch.equal(a, b)  # each row solved alone: the chunking changes no bit (on the CPU)


def test_refit_patterns_as_int8_equal_float32():
    W, H = _problem(rows=10, cols=64)
    g = torch.Generator().manual_seed(3)
    signs, on = torch.rand(10, 64, generator=g) > 0.5, torch.rand(10, 64, generator=g) > 0.3
    as_float = torch.stack([pm1(signs) * on, on.float()])  # a signed slot and a mean slot
    as_int8 = torch.stack([torch.where(on, torch.where(signs, 1, -1), 0), on.long()]).to(torch.int8)
    block_of = torch.arange(64) // 32
    assert torch.equal(refit_scales(W, H, as_int8, block_of, 2), refit_scales(W, H, as_float, block_of, 2))


def test_refit_chunks_follow_the_free_memory(monkeypatch):
    import billm.methods.refine as refine

    W, H = _problem(rows=10, cols=64)
    patterns = torch.stack([pm1(torch.rand(10, 64) > 0.5)])
    block_of = torch.arange(64) // 32
    chunks = []
    real_solve = refine._solve
    monkeypatch.setattr(refine, "_solve", lambda G, rhs: chunks.append(G.shape[0]) or real_solve(G, rhs))
    monkeypatch.setattr(refine, "free_bytes", lambda device: 4 * 8 * 2 * 64 * 4)  # a quarter: 4 rows' B H
    a = refit_scales(W, H, patterns, block_of, 2)
    assert chunks == [4, 4, 2]
    chunks.clear()
    monkeypatch.setattr(refine, "free_bytes", lambda device: 1 << 40)
    assert torch.equal(refit_scales(W, H, patterns, block_of, 2), a)
    assert chunks == [10]  # plenty of memory: one chunk, the Hessian read once


def test_refit_workspace_is_bounded_by_the_hessian_not_the_free_memory(monkeypatch):
    import billm.methods.refine as refine

    monkeypatch.setattr(refine, "free_bytes", lambda device: 1 << 40)  # a terabyte free takes no more
    cpu = torch.device("cpu")
    # a 70B down_proj under billm:tiny: 224 blocks of 128 columns, 4 slots each -> blocksize / S = 32 rows
    assert refine.chunk_rows(8192, 224 * 4, 28672, cpu) == 32
    assert refine.chunk_rows(1536, 48 * 4, 6144, cpu) == 32  # a 1536 x 6144 layer: 32 rows, 302 MB of B H
    assert refine.chunk_rows(10, 2, 64, cpu) == 10  # small layers: the 64 MiB floor, one chunk
    monkeypatch.setattr(refine, "free_bytes", lambda device: 4 * 8 * 2 * 64 * 4)  # little free: a quarter of it
    assert refine.chunk_rows(10, 2, 64, cpu) == 4


def test_intra_block_pass_never_waits_on_the_device(monkeypatch):
    from torch.overrides import TorchFunctionMode

    import billm.methods.billm as bm

    class Syncs(TorchFunctionMode):  # a host read of a device value: bool(), .item(), int(), ...
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in {"__bool__", "item", "tolist", "__int__", "__float__", "__index__"}:
                Syncs.calls += 1
            return func(*args, **(kwargs or {}))

    real = bm.intra_block_columns

    def counted(*a, **k):
        with Syncs():
            return real(*a, **k)

    monkeypatch.setattr(bm, "intra_block_columns", counted)
    W, H = _problem(rows=16, cols=64)
    get_method("billm")(W, H, BiLLMConfig(blocksize=32, intra_block=True), None)
    assert Syncs.calls == 0  # at 28672 columns, one sync a column would stall a GPU 28672 times a layer


@pytest.mark.parametrize("kw", [dict(intra_block=True), dict(refit=True), dict(refine_rounds=2),
                                dict(intra_block=True, refit=True, refine_rounds=2),
                                dict(centred=True, refit=True, refine_rounds=1)])
def test_options_lower_the_layer_error_and_keep_the_packed_form_exact(kw):
    W, H = _problem(rows=32, cols=160)
    plain = get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=64, centred=kw.get("centred", False)))
    res = get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=64, **kw))
    assert torch.equal(res.stored.decode(), res.q)
    assert res.weight_bits == pytest.approx(plain.weight_bits, abs=0.2)
    if kw.get("refit"):  # the refit minimises this very error over a set that holds the plain scales
        assert hessian_error(W, res.q, H)[1] < hessian_error(W, plain.q, H)[1]


def test_real_layer_gains(shared_data):
    from safetensors.torch import load_file

    d = load_file(str(shared_data / "reference" / "billm_reference_block0.safetensors"))
    W, H = d["q_proj.weight"], d["q_proj.hessian"]
    base = hessian_error(W, get_method("billm")(W.clone(), H.clone(), BiLLMConfig()).q, H)[1]
    plus = hessian_error(W, get_method("billm")(W.clone(), H.clone(), BiLLMConfig.plus()).q, H)[1]
    assert plus < 0.5 * base  # measured: 0.0186 -> about 0.005


def test_specs_presets_and_cli_flags(tmp_path):
    assert parse_method("billm:plus") == BiLLMConfig.plus()
    assert parse_method("billm:intra+refine3+b256") == BiLLMConfig(intra_block=True, refine_rounds=3, blocksize=256)
    with pytest.raises(BillmError, match="unknown billm option"):
        parse_method("billm:turbo")
    from billm.cli import config_from_args, build_parser

    args = build_parser().parse_args(["quantize", "m", "--out", str(tmp_path), "--intra-block", "--refit",
                                      "--refine-rounds", "1"])
    cfg = config_from_args(args)
    assert (cfg.intra_block, cfg.refit, cfg.refine_rounds) == (True, True, 1)
    args = build_parser().parse_args(["quantize", "m", "--out", str(tmp_path), "--preset", "plus"])
    assert config_from_args(args) == BiLLMConfig.plus()
