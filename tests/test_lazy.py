"""Models bigger than memory: an empty model filled block by block from safetensors shards, accelerate's disk
offload, the model's own dtype; every route writes the same bytes as the eager one."""

import hashlib
import json
import weakref

import pytest
import torch

import billm
from billm import BiLLMConfig, GPTQConfig, SliMConfig
from billm.model import LazyWeights, load_skeleton
from billm.packing.checkpoint import WEIGHTS

CONFIGS = {"billm": BiLLMConfig(blocksize=32), "gptq": GPTQConfig(bits=2, groupsize=32, blocksize=32),
           "slim": SliMConfig(bits=2, groupsize=16, blocksize=32)}
CALIB = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def fp16_folder(tmp_path_factory, tiny_model):
    """A tiny LLaMA saved in fp16 as several safetensors shards (with an index)."""
    folder = tmp_path_factory.mktemp("fp16") / "tiny"
    tiny_model("llama").to(torch.float16).save_pretrained(folder, max_shard_size="100KB")
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def _sha(folder):
    return hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()


def _eager(folder, cfg, out):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    billm.quantize(model, CALIB, cfg, progress=False)
    return billm.save(model, out)


@pytest.mark.parametrize("method", CONFIGS)
def test_block_by_block_checkpoint_is_byte_identical_to_the_eager_one(method, fp16_folder, tmp_path):
    model, weights = load_skeleton(fp16_folder)
    assert all(p.is_meta for p in model.model.layers.parameters())  # nothing read yet
    billm.quantize(model, CALIB, CONFIGS[method], progress=False, weights=weights)
    assert not any(p.is_meta for p in model.parameters())
    assert _sha(billm.save(model, tmp_path / "lazy")) == _sha(_eager(fp16_folder, CONFIGS[method], tmp_path / "eager"))


def test_the_embeddings_and_head_are_empty_while_the_blocks_are_quantized(fp16_folder, monkeypatch):
    import billm.driver as driver

    model, weights = load_skeleton(fp16_folder)
    seen = []
    hessians = driver._accumulate_hessians

    def spy(run, i):
        seen.append((model.model.embed_tokens.weight.is_meta, model.lm_head.weight.is_meta))
        return hessians(run, i)

    monkeypatch.setattr(driver, "_accumulate_hessians", spy)
    billm.quantize(model, CALIB, CONFIGS["gptq"], progress=False, weights=weights)
    assert seen == [(True, True)] * len(model.model.layers)  # read for the capture, then released; the head never
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # read back at the end
        assert torch.equal(model.get_parameter(name), weights.read(name))


def test_an_empty_models_packed_blocks_wait_in_the_store_and_a_resumed_run_writes_the_same_bytes(
        fp16_folder, tmp_path, monkeypatch):
    import billm.driver as driver
    from billm.packing.linear import PackedLinear
    from billm.resume import ProgressStore

    hessians, seen, stop = driver._accumulate_hessians, [], [True]

    def spy(run, i):  # at each block: are the packed layers of the blocks before it emptied (on meta)?
        seen.append([all(b.is_meta for b in m.buffers()) for j in range(i) for m in run.blocks[j].modules()
                     if isinstance(m, PackedLinear)])
        if stop[0] and i == 1:
            raise RuntimeError("stopped")
        return hessians(run, i)

    monkeypatch.setattr(driver, "_accumulate_hessians", spy)
    store = lambda: ProgressStore(tmp_path / "progress", {"run": "lazy"})  # noqa: E731
    model, weights = load_skeleton(fp16_folder)
    with pytest.raises(RuntimeError, match="stopped"):
        billm.quantize(model, CALIB, CONFIGS["gptq"], progress=False, weights=weights, store=store())
    stop[0] = False
    model, weights = load_skeleton(fp16_folder)  # a new process, as it were: resumes after block 0
    report = billm.quantize(model, CALIB, CONFIGS["gptq"], progress=False, weights=weights, store=store())
    assert report.resumed_blocks == 1
    assert seen == [[], [True] * 7, [True] * 7]  # block 0 emptied once recorded, and again once replayed
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert _sha(billm.save(model, tmp_path / "lazy")) == _sha(_eager(fp16_folder, CONFIGS["gptq"], tmp_path / "eager"))


@pytest.mark.parametrize("method", ["billm", "gptq"])
def test_accelerate_disk_offload_quantizes_to_the_same_bytes(method, fp16_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                  "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(fp16_folder, device_map=device_map, offload_folder=tmp_path / "off")
    assert model.model.layers[1].mlp.up_proj.weight.is_meta  # on disk, read through accelerate's hook
    billm.quantize(model, CALIB, CONFIGS[method], progress=False)
    assert _sha(billm.save(model, tmp_path / "off-q")) == _sha(_eager(fp16_folder, CONFIGS[method], tmp_path / "eager"))


def test_the_model_keeps_its_dtype_and_the_checkpoint_too(tiny_model, tmp_path):
    folder = tmp_path / "bf16"
    tiny_model("qwen2").to(torch.bfloat16).save_pretrained(folder)
    model, weights = load_skeleton(folder)
    assert model.dtype == torch.bfloat16  # the checkpoint's own dtype, not float32
    report = billm.quantize(model, CALIB, BiLLMConfig(blocksize=32), progress=False, weights=weights)
    assert all(0 < r.hessian_rel_err < 1 for r in report.layers)  # the math ran (in float32) and is sane
    out = billm.save(model, tmp_path / "q")
    assert json.loads((out / "billm_quant.json").read_text())["dtype"] == "bfloat16"
    assert billm.load(out).model.embed_tokens.weight.dtype == torch.bfloat16


def test_finished_blocks_keep_only_their_packed_form(tiny_model):
    model = tiny_model("llama")
    originals = [weakref.ref(b.mlp.down_proj) for b in model.model.layers]
    billm.quantize(model, CALIB, BiLLMConfig(blocksize=32), progress=False)
    assert all(r() is None for r in originals)  # the float linears are freed, not kept beside the packed ones


def test_an_empty_model_without_a_source_is_a_clear_error(fp16_folder):
    model, _ = load_skeleton(fp16_folder)
    with pytest.raises(billm.ModelError, match="meta device.*weights="):
        billm.quantize(model, CALIB, BiLLMConfig(blocksize=32), progress=False)


def test_a_tensor_missing_from_the_shards_is_named(fp16_folder, tmp_path):
    model, weights = load_skeleton(fp16_folder)
    del weights.loaders["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(billm.ModelError, match="model.layers.1.mlp.up_proj.weight"):
        billm.quantize(model, CALIB, BiLLMConfig(blocksize=32), progress=False, weights=weights)


def test_non_finite_weights_are_refused_when_the_block_is_read(fp16_folder):
    model, weights = load_skeleton(fp16_folder)
    read = weights.loaders["model.layers.1.self_attn.k_proj.weight"]
    weights.loaders["model.layers.1.self_attn.k_proj.weight"] = lambda: read().index_fill(0, torch.tensor([0]), float("nan"))
    with pytest.raises(billm.QuantizationError, match="layers.1.self_attn.k_proj: the weight has NaN"):
        billm.quantize(model, CALIB, BiLLMConfig(blocksize=32), progress=False, weights=weights)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_cli_reads_blocks_lazily_in_the_saved_dtype(tiny_config, byte_tokenizer, tmp_path, tied):
    """Block by block, the checkpoint is streamed from the progress folder and the source: the same bytes."""
    from transformers import AutoModelForCausalLM

    from billm.cli import main

    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(cfg).to(torch.float16).save_pretrained(folder)
    byte_tokenizer(model_max_length=256).save_pretrained(folder)
    argv = ["quantize", str(folder), "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert main([*argv, "--out", str(tmp_path / "lazy")]) == 0
    assert main([*argv, "--out", str(tmp_path / "eager"), "--eager-load"]) == 0
    assert _sha(tmp_path / "lazy") == _sha(tmp_path / "eager")
    lazy_map, eager_map = (json.loads((tmp_path / d / "billm_quant.json").read_text()) for d in ("lazy", "eager"))
    assert lazy_map["files"] == eager_map["files"] and lazy_map["tied"] == eager_map["tied"]
    assert bool(lazy_map["tied"]) == tied
    assert json.loads((tmp_path / "lazy" / "billm_quant.json").read_text())["dtype"] == "float16"
    assert main([*argv, "--out", str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    assert json.loads((tmp_path / "f32" / "billm_quant.json").read_text())["dtype"] == "float32"


def test_lazy_weights_read_single_file_and_refuse_other_formats(tiny_model, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "one")
    w = LazyWeights.from_folder(tmp_path / "one")
    assert w.read("model.norm.weight").shape == (64,)
    (tmp_path / "none").mkdir()
    with pytest.raises(billm.ModelError, match="no model.safetensors"):
        LazyWeights.from_folder(tmp_path / "none")


def test_leaving_the_blocks_in_the_store_needs_a_store_and_an_empty_model(fp16_folder, tiny_model):
    model, weights = load_skeleton(fp16_folder)
    with pytest.raises(billm.ModelError, match="read_back=False needs"):
        billm.quantize(model, CALIB, BiLLMConfig(blocksize=32), progress=False, weights=weights, read_back=False)
    with pytest.raises(billm.ModelError, match="read_back=False needs"):
        billm.quantize(tiny_model("llama"), CALIB, BiLLMConfig(blocksize=32), progress=False, read_back=False)
