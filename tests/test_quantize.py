"""End to end on tiny random models of every family in ``conftest.FAMILIES``, the structural BiLLM check, options, errors."""

import pytest
import torch

import billm
from billm import BiLLMConfig, DataError, ModelError, QuantizationError
from billm.driver import PHASES
from billm.model.walker import capture_inputs, find_blocks, find_linears, get_weight, run_block

from conftest import FAMILIES, tiny_model


def _ids(n=8, seqlen=32, seed=0):
    return torch.randint(3, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_walker_replays_the_model_exactly(family):
    # Capturing the first block's inputs and running the blocks one by one must give the
    # same hidden states as the model's own forward: proves every kwarg was captured.
    model = tiny_model(family)
    ids = _ids(2, 16)
    name, blocks = find_blocks(model)
    assert len(blocks) == 2
    inputs = capture_inputs(model, [ids])
    seen = {}
    hook = blocks[-1].register_forward_hook(lambda m, a, o: seen.setdefault("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    hook.remove()
    for i, b in enumerate(blocks):
        inputs.hidden = run_block(b, inputs, "cpu", "cpu", i)
    torch.testing.assert_close(inputs.hidden[0], seen["out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_families_quantize_end_to_end(family):
    model = tiny_model(family)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
    emb, head = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    n_lin = sum(len(find_linears(b)) for b in find_blocks(model)[1])
    rep = billm.quantize(model, ids, BiLLMConfig(), progress=False)
    assert len(rep.layers) == n_lin > 0
    # the model now holds the packed layers themselves, and no quantizable linear is left in its blocks
    assert sum(isinstance(m, billm.PackedLinear) for m in model.modules()) == n_lin
    assert sum(len(find_linears(b)) for b in find_blocks(model)[1]) == 0
    for r in rep.layers:
        assert 1.0 < r.weight_bits < 2.0
        assert 0 < r.hessian_rel_err < 1.0  # better than zeroing the layer
        assert r.info["salient_cols"] >= 1
    assert set(rep.phases) == set(PHASES)
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    # the embeddings and the head stay full precision: plain modules, the same weights
    assert not isinstance(model.get_output_embeddings(), billm.PackedLinear)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)


def _distinct_levels(model, rep, blocksize=128):
    """Max distinct values per row and block, separately for salient and non-salient entries."""
    mods = dict(model.named_modules())
    worst = [0, 0]
    for r in rep.layers:
        W = get_weight(mods[r.name])
        for b, cols in enumerate(r.info["salient_columns"]):
            st = b * blocksize
            blk = W[:, st:st + blocksize]
            sal = torch.zeros(blk.shape[1], dtype=torch.bool)
            sal[[c - st for c in cols]] = True
            for row in blk:
                worst[0] = max(worst[0], len(torch.unique(row[~sal])))
                if sal.any():
                    worst[1] = max(worst[1], len(torch.unique(row[sal])))
    return worst


@pytest.mark.parametrize("cfg", [BiLLMConfig(), BiLLMConfig.reference(), BiLLMConfig(blocksize=32)])
def test_structure_is_really_billm(cfg):
    # Within every row of every block: non-salient entries take at most 4 values
    # (2 per split group), salient columns at most 4 (order-2 residual binarization).
    model = tiny_model("llama")
    rep = billm.quantize(model, _ids(), cfg, progress=False)
    non, sal = _distinct_levels(model, rep, cfg.blocksize)
    assert non <= 4 and sal <= 4
    assert non >= 3  # the split is really used (not a plain sign quantizer)


@pytest.fixture(scope="module")
def default_quantized():
    base = tiny_model("llama")
    billm.quantize(base, _ids(), BiLLMConfig(blocksize=32), progress=False)  # several blocks: compensation acts
    return get_weight(base.model.layers[0].mlp.down_proj).clone()


@pytest.mark.parametrize("opts", [
    dict(salient_metric="magnitude"), dict(search_domain="salience"), dict(break_grid="quantile", n_break_candidates=81),
    dict(centred=True), dict(min_salient_cols=1, max_salient_cols=1), dict(percdamp=0.1), dict(salient_search_order=2),
])
def test_options_change_the_result(opts, default_quantized):
    other = tiny_model("llama")
    rep = billm.quantize(other, _ids(), BiLLMConfig(blocksize=32, **opts), progress=False)
    a = default_quantized
    b = get_weight(other.model.layers[0].mlp.down_proj)
    assert not torch.equal(a, b)
    if "max_salient_cols" in opts:
        assert all(len(c) == 1 for r in rep.layers for c in r.info["salient_columns"])


def test_include_exclude_patterns():
    model = tiny_model("llama")
    rep = billm.quantize(model, _ids(), BiLLMConfig(include=("mlp.*",), exclude=("*.down_proj",)), progress=False)
    names = sorted({r.name.split(".")[-1] for r in rep.layers})
    assert names == ["gate_proj", "up_proj"]
    assert len(rep.layers) == 4


def test_report_serialises():
    import json

    model = tiny_model("qwen2")
    rep = billm.quantize(model, _ids(4, 16), BiLLMConfig(), progress=False)
    d = json.loads(json.dumps(rep.to_dict()))
    assert d["config"]["method"] == "billm" and d["nsamples"] == 4 and d["seqlen"] == 16
    assert 1 < d["weight_bits"] < 2


def test_no_linears_is_a_clear_error():
    with pytest.raises(ModelError, match="no linear layers"):
        billm.quantize(tiny_model("llama"), _ids(), BiLLMConfig(exclude=("*",)), progress=False)


def test_seqlen_beyond_model_is_a_clear_error():
    with pytest.raises(DataError, match="exceeds"):
        billm.quantize(tiny_model("llama"), _ids(1, 300), BiLLMConfig(), progress=False)


def test_empty_calibration_is_a_clear_error():
    with pytest.raises(DataError, match="no calibration samples"):
        billm.quantize(tiny_model("llama"), torch.zeros(0, 16, dtype=torch.long), BiLLMConfig(), progress=False)


def test_nan_weight_is_a_clear_error_naming_the_layer():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=r"layers\.1\.self_attn\.k_proj"):
        billm.quantize(model, _ids(), BiLLMConfig(), progress=False)


def test_deterministic():
    a, b = tiny_model("llama"), tiny_model("llama")
    billm.quantize(a, _ids(), BiLLMConfig(), progress=False)
    billm.quantize(b, _ids(), BiLLMConfig(), progress=False)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("family,expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("opt", [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.out_proj"], ["fc1"], ["fc2"]]),
])
def test_linears_fed_one_tensor_share_one_hessian(family, expected):
    from billm.driver import shared_input_groups

    model = tiny_model(family)
    block = find_blocks(model)[1][0]
    inputs = capture_inputs(model, [_ids(2, 16)])
    assert shared_input_groups(block, find_linears(block), inputs, "cpu") == expected


def test_model_without_decoder_blocks_is_a_clear_error():
    from torch import nn

    class Flat(nn.Module):  # no repeated block list anywhere
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    with pytest.raises(billm.ModelError, match="no decoder-block list found"):
        billm.quantize(Flat(), torch.zeros(1, 4, dtype=torch.long), billm.BiLLMConfig())


def test_disk_estimate_counts_the_full_precision_stream(tiny_model):
    from billm.driver import estimate_run_bytes

    model = tiny_model("llama")
    quantized = [m.weight for n, m in model.named_modules() if n.endswith("q_proj")]
    hidden = 4 * 32 * model.get_input_embeddings().embedding_dim * 4  # nsamples x seqlen x dim, float32
    plain = estimate_run_bytes(model, billm.BiLLMConfig(), quantized, 4, 32)
    for spec in ("tiny+rec5+fpinputs", "tiny+ft5+finetune_target=fp"):
        assert estimate_run_bytes(model, billm.BiLLMConfig.from_spec(spec), quantized, 4, 32) == plain + 2 * hidden
    assert estimate_run_bytes(model, billm.BiLLMConfig.from_spec("tiny+rec5"), quantized, 4, 32) == plain


@pytest.mark.parametrize("spec,freed", [("billm", True), ("gptq:w2g128", True), ("pbllm", True), ("arb", True),
                                        ("billm:plus+hadamard", True), ("billm:tiny", False), ("arb:x", False),
                                        ("slim:w2", False)])
def test_last_user_of_a_hessian_frees_it_and_stores_the_same_bytes(spec, freed):
    # A method that reads its Hessian no more frees it once factored when no later linear shares it; the stored
    # bytes do not change, and the output error figure comes from the factor instead, equal up to rounding.
    from billm.driver import quantize_linear
    from billm.methods.obc import OBCTimes
    from billm.methods.registry import config_from_spec, method_of

    from conftest import random_problem

    W, H = random_problem(48, 256, outlier_cols=(5,))
    H[:, 7] = H[7, :] = 0  # a dead input column
    config = config_from_spec(spec)
    out = {}
    for last_use in (False, True):
        lin = torch.nn.Linear(256, 48, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        Hc = H.clone()
        packed, rep = quantize_linear(lin, Hc, config, method_of(config), "blocks.0.down_proj", OBCTimes(),
                                      last_use=last_use)
        assert (Hc.numel() == 0) == (freed and last_use)
        out[last_use] = ({k: v.clone() for k, v in packed.stored().tensors.items()}, rep.hessian_rel_err)
    (kept, err_kept), (freed_t, err_freed) = out[False], out[True]
    assert kept.keys() == freed_t.keys() and all(torch.equal(kept[k], freed_t[k]) for k in kept)
    assert 0 < err_kept < 1 and err_freed == pytest.approx(err_kept, rel=1e-5)


def test_a_method_that_releases_its_hessian_and_returns_no_simulated_weights_gets_its_error_from_the_factor():
    # the error figure then waits for the decode, and the factor with it
    from dataclasses import replace

    from billm.driver import quantize_linear
    from billm.methods.obc import OBCTimes
    from billm.methods.registry import Method, config_from_spec, method_of

    from conftest import random_problem

    W, H = random_problem(48, 256)
    config = config_from_spec("gptq:w2g128")
    gptq = method_of(config)
    no_q = Method(gptq.config, lambda *a: replace(gptq(*a), q=None))
    errs = []
    for method in (gptq, no_q):
        lin = torch.nn.Linear(256, 48, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        Hc = H.clone()
        errs.append(quantize_linear(lin, Hc, config, method, "blocks.0.down_proj", OBCTimes(), last_use=True)[1])
        assert Hc.numel() == 0
    assert errs[1].hessian_rel_err == errs[0].hessian_rel_err and errs[1].weight_rel_err == errs[0].weight_rel_err


def test_a_factor_of_some_other_hessian_never_stands_in_for_the_drivers():
    # a method may factor (and release) a Hessian it derived itself; the driver's own H, left whole, gives the error
    from billm.driver import quantize_linear
    from billm.methods.obc import OBCTimes, last_use_of_factor
    from billm.methods.registry import Method, config_from_spec, method_of

    from conftest import random_problem

    W, H = random_problem(48, 256)
    config = config_from_spec("gptq:w2g128")
    gptq = method_of(config)
    doubled = Method(gptq.config, lambda W_, H_, cfg, times: gptq(W_, H_ * 2, cfg, times))  # same weights: H scaled
    reports = []
    for method, last_use in ((gptq, False), (doubled, True)):
        lin = torch.nn.Linear(256, 48, bias=False)
        with torch.no_grad():
            lin.weight.copy_(W)
        Hc = H.clone()
        reports.append(quantize_linear(lin, Hc, config, method, "blocks.0.o_proj", OBCTimes(), last_use=last_use)[1])
        assert Hc.shape == (256, 256)
    assert reports[1].hessian_rel_err == pytest.approx(reports[0].hessian_rel_err, rel=1e-6)
    with last_use_of_factor():  # an enclosing last use does not reach a call that says a later linear reads H
        lin = torch.nn.Linear(256, 48, bias=False)
        Hc = H.clone()
        quantize_linear(lin, Hc, config, gptq, "blocks.0.q_proj", OBCTimes(), last_use=False)
        assert Hc.shape == (256, 256)
