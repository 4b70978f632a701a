"""``torch.compile`` and the ``billm::packed_linear`` custom op: a PackedLinear is one opaque call in the graph.

The compiled tests use the ``aot_eager`` backend: it traces with Dynamo and AOTAutograd (what a
graph break or a wrong fake kernel would fail) but runs the graph eagerly, so no C++ compiler runs
(inductor on this 2-core CPU takes minutes a test).
"""

import pytest
import torch

import billm
from billm import BiLLMConfig, GPTQConfig, PBLLMConfig, SignConfig, SliMConfig
from billm.kernels.layout import flatten, unflatten
from billm.methods import get_method
from billm.packing.linear import PackedLinear

CONFIGS = [
    pytest.param(BiLLMConfig.reference(blocksize=20), id="billm-reference-b20"),
    pytest.param(GPTQConfig(bits=3, groupsize=16, blocksize=32), id="gptq-w3-g16"),
    pytest.param(SliMConfig(bits=2, groupsize=16, blocksize=32), id="slim-w2-g16"),
    pytest.param(SignConfig(centred=True), id="sign-centred"),
    pytest.param(PBLLMConfig(blocksize=32), id="pbllm"),  # no layout: the op decodes with the format
]


@pytest.fixture(scope="module")
def layer(random_problem):
    def _layer(cfg, shape=(40, 96), seed=0):
        W, H = random_problem(*shape, seed=seed)
        res = get_method(cfg.method)(W.clone(), H, cfg)
        return PackedLinear.from_stored(res.stored, torch.randn(shape[0])), res.q

    return _layer


@pytest.mark.parametrize("cfg", CONFIGS[:4])
def test_layouts_flatten_and_come_back(layer, cfg):
    m, _ = layer(cfg)
    lay = m.layout()
    spec, tensors = flatten(lay)
    back = unflatten(spec, tensors)
    assert flatten(back)[0] == spec and all(a is b for a, b in zip(flatten(back)[1], tensors))
    with pytest.raises(ValueError, match="needs more than"):
        unflatten(spec, tensors[:-1])
    with pytest.raises(ValueError, match="takes fewer than"):
        unflatten(spec, tensors + [tensors[0]])


@pytest.mark.parametrize("cfg", CONFIGS)
def test_the_custom_op_passes_opcheck(layer, cfg):
    m, _ = layer(cfg)
    op = m.prepare()
    x = torch.randn(3, 96)
    for kernel in ("", "dense", "dequant"):
        args = (x, op.layout_tensors, op.stored_tensors, m.bias, op.spec, kernel)
        torch.library.opcheck(torch.ops.billm.packed_linear.default, args)


def _graphs():
    """A Dynamo backend that records each graph it is given and runs it as it is."""
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm.forward

    return seen, backend


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("tokens", [1, 100])  # the lookup path, and dense (or dequant) for a long input
def test_compiled_model_has_one_graph_with_the_op_and_the_eager_output(layer, cfg, tokens):
    torch._dynamo.reset()
    a, _ = layer(cfg, (64, 96), seed=0)
    b, _ = layer(cfg, (96, 64), seed=1)
    model = torch.nn.Sequential(a, torch.nn.GELU(), b)
    x = torch.randn(2, tokens, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)  # eager: also builds the op inputs
        seen, backend = _graphs()
        y = torch.compile(model, backend=backend, fullgraph=True)(x)  # fullgraph: a graph break is an error
    assert len(seen) == 1
    targets = [n.target for n in seen[0].graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.billm.packed_linear.default) == 2
    assert torch.equal(y, ref)


def test_aot_eager_compiles_a_packed_model(layer):
    torch._dynamo.reset()
    m, q = layer(BiLLMConfig(blocksize=32))
    x = torch.randn(5, 96)
    billm.prepare_model(m)
    with torch.no_grad():
        y = torch.compile(m, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, x @ q.t() + m.bias, rtol=1e-5, atol=1e-5)


def test_compiling_an_unprepared_layer_says_what_to_do(layer):
    torch._dynamo.reset()
    m, _ = layer(SignConfig())
    with pytest.raises(Exception, match="prepare_model"):
        torch.compile(m, backend="eager", fullgraph=True)(torch.randn(2, 96))


def test_gradients_flow_to_the_input_outside_the_op(layer):
    m, q = layer(BiLLMConfig(blocksize=32))
    x = torch.randn(4, 96, requires_grad=True)
    m(x).sum().backward()
    torch.testing.assert_close(x.grad, q.sum(0).expand(4, -1), rtol=1e-5, atol=1e-5)


def test_prepared_inputs_follow_the_kernel_choice(layer):
    m, _ = layer(GPTQConfig(bits=3, groupsize=16, blocksize=32))
    m.kernel = "dequant"
    assert m.prepare().layout_tensors == []  # no layout built for the format's own decoder
    m.kernel = "lut"
    assert m.prepare().layout_tensors  # now it is
    other, _ = layer(SignConfig(), seed=1)
    assert billm.prepare_model(torch.nn.Sequential(m, torch.nn.ReLU(), other)) == 2 and other._op is not None


def test_generate_compiles_with_a_static_cache(tiny_folder, tmp_path, capsys):
    from billm.cli import main

    torch._dynamo.reset()
    out = tmp_path / "q"
    assert main(["quantize", str(tiny_folder), "--calib", "pydoc", "--nsamples", "2", "--seqlen", "32", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", str(out), "def f(", "--max-new-tokens", "4"]) == 0
    eager = capsys.readouterr().out
    from torch._dynamo.utils import counters

    counters.clear()
    assert main(["generate", str(out), "def f(", "--max-new-tokens", "4", "--compile", "aot_eager"]) == 0
    assert capsys.readouterr().out == eager  # greedy: the same tokens
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # compiled, in whole graphs
