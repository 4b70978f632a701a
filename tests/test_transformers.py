"""billm checkpoints through transformers: from_pretrained after ``import billm`` equals billm.load for every
family and format, save_pretrained round trips, plain transformers refuses the folder naming billm, older
folders still load, pipeline generates, and lm-eval's ``hf`` route scores like billm's own scorer."""

import json
import os
import subprocess
import sys

import pytest
import torch

import billm
from billm import ArbConfig, BiLLMConfig, GPTQConfig, LowRankConfig, PBLLMConfig, RTNConfig, SignConfig, SliMConfig
from billm.packing.checkpoint import QUANT_MAP
from billm.packing.guard import GUARD_MODEL_TYPE, REAL_TYPE_KEY

from conftest import FAMILIES

# one configuration per stored format (reference: float32 scales, which must not be cast on load)
FORMAT_CONFIGS = {
    "billm": BiLLMConfig(blocksize=32),
    "billm-reference-fp32-scales": BiLLMConfig.reference(blocksize=32),
    "billm-fp8-scales": BiLLMConfig(blocksize=32, scale_dtype="float8_e4m3fn"),
    "grid-rtn": RTNConfig(bits=3, groupsize=32),
    "grid-gptq-act-order": GPTQConfig(bits=2, groupsize=16, act_order=True, blocksize=32),
    "mixed-slim": SliMConfig(bits=2, groupsize=16, blocksize=32),
    "sign": SignConfig(),
    "pbllm": PBLLMConfig(blocksize=32),
    "arb": ArbConfig(blocksize=32),
    "lowrank": LowRankConfig(rank=8, admm_iters=10),
}


def _checkpoint(quantized_tiny, family, cfg, folder, seed=0, tokenizer=None):
    model, report = quantized_tiny(family, cfg, seed)
    return billm.save(model, folder, tokenizer, report=report)


def _decode_logits(model, ids):
    billm.set_kernel(model, "dequant")
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 120, (2, 20), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_from_pretrained_equals_billm_load_every_family(family, quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _checkpoint(quantized_tiny, family, BiLLMConfig(blocksize=32), tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(out)
    ours = billm.load(out)
    assert [n for n, m in hf.named_modules() if isinstance(m, billm.PackedLinear)] == \
           [n for n, m in ours.named_modules() if isinstance(m, billm.PackedLinear)]
    assert torch.equal(_decode_logits(hf, IDS), _decode_logits(ours, IDS))


@pytest.mark.parametrize("cfg", FORMAT_CONFIGS.values(), ids=FORMAT_CONFIGS.keys())
def test_from_pretrained_equals_billm_load_every_format(cfg, quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _checkpoint(quantized_tiny, "opt", cfg, tmp_path / "ck")  # OPT: a bias on every linear
    hf = AutoModelForCausalLM.from_pretrained(out)
    ours = billm.load(out)
    for (name, a), (_, b) in zip(hf.named_buffers(), ours.named_buffers()):
        assert a.dtype == b.dtype, name  # packed fields keep the format's dtypes
    assert torch.equal(_decode_logits(hf, IDS), _decode_logits(ours, IDS))


def test_from_pretrained_in_bf16_keeps_the_packed_dtypes(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _checkpoint(quantized_tiny, "llama", BiLLMConfig.reference(blocksize=32), tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16, device_map="cpu")
    ours = billm.load(out, dtype=torch.bfloat16)
    layer = hf.model.layers[0].self_attn.q_proj
    assert isinstance(layer, billm.PackedLinear) and layer.packed_scales.dtype == torch.float32
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, ours.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(_decode_logits(hf, IDS), _decode_logits(ours, IDS))


def test_config_json_is_guarded_and_lists_the_layers(quantized_tiny, tmp_path):
    out = _checkpoint(quantized_tiny, "llama", BiLLMConfig(blocksize=32), tmp_path / "ck")
    cfg = json.loads((out / "config.json").read_text())
    qmap = json.loads((out / QUANT_MAP).read_text())
    assert cfg["model_type"] == GUARD_MODEL_TYPE and cfg[REAL_TYPE_KEY] == "llama"
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "billm" and qc["format_version"] == qmap["format_version"] == 3
    # the structure transformers builds from agrees with the quantization map, layer by layer
    assert set(qc["layers"]) == set(qmap["layers"])
    for name, layer in qc["layers"].items():
        assert layer.items() <= qmap["layers"][name].items()


def test_save_pretrained_writes_a_folder_that_loads_again(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _checkpoint(quantized_tiny, "llama", SliMConfig(bits=2, groupsize=16, blocksize=32), tmp_path / "ck")
    hf = AutoModelForCausalLM.from_pretrained(out)
    hf.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == GUARD_MODEL_TYPE
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(_decode_logits(again, IDS), _decode_logits(billm.load(out), IDS))
    assert billm.save(again, tmp_path / "third").is_dir()  # and billm.save reads it like any billm model


PLAIN_LOAD = """
import sys
from transformers import AutoModelForCausalLM
try:
    AutoModelForCausalLM.from_pretrained(sys.argv[1])
except Exception as e:
    print("REFUSED", type(e).__name__, e)
    sys.exit(0)
print("LOADED")
sys.exit(1)
"""


def test_plain_transformers_refuses_the_folder_naming_billm(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _checkpoint(quantized_tiny, "llama", BiLLMConfig(blocksize=32), tmp_path / "ck")
    AutoModelForCausalLM.from_pretrained(out).save_pretrained(tmp_path / "resaved")
    for folder in (out, tmp_path / "resaved"):
        r = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folder)], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 0 and "REFUSED" in r.stdout, r.stdout + r.stderr
        assert "import billm" in r.stdout and "pip install billm" in r.stdout


def _to_format_version_2(folder):
    """Rewrite a folder as billm wrote it before config.json was guarded and listed the layers."""
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = cfg.pop(REAL_TYPE_KEY)
    cfg["quantization_config"].pop("layers")
    cfg["quantization_config"]["format_version"] = 2
    (folder / "config.json").write_text(json.dumps(cfg))
    qmap = json.loads((folder / QUANT_MAP).read_text())
    qmap["format_version"] = 2
    (folder / QUANT_MAP).write_text(json.dumps(qmap))


def test_folders_written_before_the_guard_still_load(quantized_tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    out = _checkpoint(quantized_tiny, "qwen2", BiLLMConfig(blocksize=32), tmp_path / "ck")
    want = _decode_logits(billm.load(out), IDS)
    _to_format_version_2(out)
    assert torch.equal(_decode_logits(billm.load(out), IDS), want)
    # transformers reads the layers from the quantization map beside the weights
    assert torch.equal(_decode_logits(AutoModelForCausalLM.from_pretrained(out), IDS), want)
    (out / QUANT_MAP).unlink()
    with pytest.raises(billm.CheckpointError, match="billm.load"):
        AutoModelForCausalLM.from_pretrained(out)


def test_quantizing_while_loading_is_refused(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM

    from billm.packing.hf import _classes

    tiny_model("llama").save_pretrained(tmp_path / "fp")
    config_cls, _ = _classes()
    with pytest.raises((ValueError, billm.CheckpointError), match="pre-quantized|billm.quantize"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=config_cls())


# ----------------------------------------------------------------------------- the real model, pipelines, lm-eval

@pytest.fixture(scope="module")
def packed_smollm2(tmp_path_factory):
    from billm.data import get_calibration_batches
    from billm.model.loading import load_model

    try:
        model, tok = load_model(None)
    except billm.ModelError as e:  # pragma: no cover - the package is a test dependency
        pytest.skip(str(e))
    calib = get_calibration_batches("pydoc", tok, nsamples=2, seqlen=64, seed=0)
    billm.quantize(model, calib, RTNConfig(bits=4, groupsize=64), progress=False)
    return billm.save(model, tmp_path_factory.mktemp("smollm2") / "rtn-w4", tok), model


@pytest.mark.slow
def test_pipeline_generates_from_the_packed_smollm2(packed_smollm2):
    from transformers import pipeline

    folder, model = packed_smollm2
    pipe = pipeline("text-generation", model=str(folder), device="cpu")
    assert isinstance(pipe.model.model.layers[0].mlp.down_proj, billm.PackedLinear)
    out = pipe("def fibonacci(n):", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert out.startswith("def fibonacci(n):") and len(out) > len("def fibonacci(n):")
    # greedy tokens equal those of the model billm quantized in memory
    ids = pipe.tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert pipe.tokenizer.decode(want[0], skip_special_tokens=True) == out


@pytest.mark.slow
def test_lm_eval_hf_route_scores_like_billms_scorer(packed_smollm2, shared_data):
    import lm_eval

    from billm.eval.zeroshot import load_tasks, registry, zeroshot

    folder, _ = packed_smollm2
    ours = zeroshot(billm.load(folder), __import__("transformers").AutoTokenizer.from_pretrained(folder), ["piqa"],
                    limit=6, data_dir=shared_data, batch_size=4)["piqa"]
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu",
                                  tasks=[load_tasks(["piqa"], shared_data)["piqa"]], limit=6, batch_size=4,
                                  task_manager=registry(), log_samples=False, bootstrap_iters=100)
    assert res["results"]["piqa"]["acc,none"] == ours.metrics["acc"]
    assert res["results"]["piqa"]["acc_norm,none"] == ours.metrics["acc_norm"]


@pytest.mark.slow
def test_cli_harness_on_a_checkpoint_takes_the_pretrained_route(tiny_config, byte_tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import billm.eval.harness as harness
    from billm.cli import main

    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    billm.quantize(model, torch.randint(3, 250, (4, 32)), BiLLMConfig(blocksize=32), progress=False)
    tok = byte_tokenizer()
    folder = billm.save(model, tmp_path / "ck", tok)
    docs = [{"q": f"Colour {i} is", "c": ["red", "green", "blue"], "g": i % 3} for i in range(6)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "t.yaml").write_text(
        f"task: billm_route_toy\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 't.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_choice: '{{c}}'\n"
        "doc_to_target: '{{g}}'\nmetric_list:\n  - metric: acc\n")
    want = harness.run_harness(harness.harness_lm(billm.load(folder), tok, 4), ["billm_route_toy"],
                               include_path=str(tmp_path))["billm_route_toy"]

    def no_object_route(*a, **k):
        raise AssertionError("billm eval --harness on a checkpoint must hand the harness the folder")

    monkeypatch.setattr(harness, "harness_lm", no_object_route)
    out = tmp_path / "h.json"
    assert main(["eval", str(folder), "--harness", "--tasks", "billm_route_toy", "--include-path", str(tmp_path),
                 "--zeroshot-batch-size", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["harness"]["billm_route_toy"] == want
