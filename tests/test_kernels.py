"""Fast paths from packed weights: CPU lookup tables and the Triton kernels (interpreter on CPU).

Every path is checked against decode-then-matmul (the ``dequant`` reference) on odd shapes,
for every format that has a fast layout.
"""

import importlib
import os
import sys

import pytest
import torch

import billm
from billm.config import BiLLMConfig, GPTQConfig, PBLLMConfig, RTNConfig, SignConfig, SliMConfig
from billm.errors import BillmError
from billm import set_kernel
from billm.kernels import LUT_MAX_TOKENS, choose_path, triton_available
from billm.kernels.lut import byte_table, lut_matmul
from billm.methods import get_method

# Without a GPU (or with TRITON_INTERPRET=1 already set) the Triton kernels run in the interpreter on
# CPU tensors; otherwise they compile for CUDA. See the ``triton_matmul`` fixture.
INTERPRET = not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
KDEV = "cpu" if INTERPRET else "cuda"

FAST = [  # each with a stable, readable test id
    pytest.param(BiLLMConfig(blocksize=32), id="billm-b32"),
    # block not a multiple of 8, centred, 2nd salient plane
    pytest.param(BiLLMConfig.reference(blocksize=20), id="billm-reference-b20"),
    pytest.param(BiLLMConfig(blocksize=16, salient_order=1, centred=True), id="billm-b16-salient1-centred"),
    pytest.param(RTNConfig(bits=2), id="rtn-w2"),
    pytest.param(RTNConfig(bits=4, groupsize=12), id="rtn-w4-g12"),
    pytest.param(GPTQConfig(bits=3, groupsize=16, blocksize=32), id="gptq-w3-g16"),
    pytest.param(SliMConfig(bits=2, groupsize=16, blocksize=32), id="slim-w2-g16"),
    pytest.param(SliMConfig(bits=3, groupsize=24, blocksize=24), id="slim-w3-g24"),
    pytest.param(SignConfig(), id="sign"),
    pytest.param(SignConfig(centred=True), id="sign-centred"),
    pytest.param(BiLLMConfig(blocksize=32, scale_dtype="float8_e4m3fn"), id="billm-b32-fp8-scales"),
]
SHAPES = [(17, 131), (5, 9), (70, 200), (1, 64)]


def _shape_id(shape) -> str:
    return "x".join(map(str, shape))


@pytest.fixture(scope="module")
def stored(random_problem):
    """``stored(cfg, shape, seed=0)``: (stored weight, simulated q) of a random problem quantized by ``cfg``."""

    def _stored(cfg, shape, seed=0):
        W, H = random_problem(*shape, seed=seed)
        res = get_method(cfg.method)(W.clone(), H, cfg)
        return res.stored, res.q

    return _stored


def _interpreted(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(obj, InterpretedFunction)


@pytest.fixture(scope="module")
def triton_matmul():
    """``billm.kernels.triton_kernels.triton_matmul`` with its kernels built for ``KDEV``.

    On CPU the kernels must run in Triton's interpreter, which Triton picks from ``TRITON_INTERPRET``
    when it is first imported (its own ``tl`` helpers) and at each ``@triton.jit``. So the variable is
    set here, for this module's tests only (restored afterwards), and Triton and the kernel module
    are imported under it. Triton cannot be imported twice in one process, so on CPU it stays in
    interpreter mode for later tests (the only mode it can run in there); if something imported it
    earlier without the variable, these tests skip and say so.
    """
    if not triton_available():
        pytest.skip("triton is not installed")
    name = "billm.kernels.triton_kernels"
    if not INTERPRET:
        yield importlib.import_module(name).triton_matmul
        return
    if "triton" in sys.modules and not _interpreted(getattr(sys.modules["triton"].language.standard, "sum", None)):
        pytest.skip("Triton was imported earlier in this process without TRITON_INTERPRET=1, so its kernels "
                    "cannot run on CPU here (set TRITON_INTERPRET=1 for the whole run)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        module = importlib.import_module(name)
        if not any(_interpreted(v) for v in vars(module).values()):  # imported before without the variable
            module = importlib.reload(module)
        yield module.triton_matmul


def _close(y, ref, tol=2e-5, mag=None):
    """Max error relative to ``mag`` (default max |ref|; for a product pass ``|x| @ |W|^T``'s max:
    a sum of terms that cancels can be far smaller than the rounding of its terms)."""
    scale = (ref.abs().max() if mag is None else mag).clamp(min=1e-6)
    assert float((y - ref).abs().max() / scale) < tol


def _mag(x, q):
    return (x.abs().float() @ q.abs().t()).max()


def test_byte_table_sums_the_selected_inputs():
    x = torch.randn(2, 16)
    t = byte_table(x)  # (2 * 256, 2)
    assert torch.allclose(t[0b00000101], x[:, 0] + x[:, 2])
    assert torch.allclose(t[256 + 0b10000000], x[:, 15])
    assert torch.allclose(t[255], x[:, :8].sum(1))


@pytest.mark.parametrize("cfg", FAST)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("tokens", [1, 3, 16])
def test_lookup_path_equals_decode_then_matmul(stored, cfg, shape, tokens):
    st, q = stored(cfg, shape)
    layout = st.layout()
    assert layout is not None
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
    _close(lut_matmul(x, layout), x @ q.t(), mag=_mag(x, q))


@pytest.mark.parametrize("cfg", [PBLLMConfig(blocksize=32), GPTQConfig(bits=3, groupsize=16, act_order=True)],
                         ids=["pbllm", "gptq-act-order"])
def test_formats_without_a_fast_layout_fall_back_to_decoding(stored, cfg):
    st, q = stored(cfg, (17, 131))
    assert st.layout() is None
    layer = billm.PackedLinear.from_stored(st)
    x = torch.randn(1, 131)
    layer.kernel = "lut"
    assert torch.equal(layer(x), x @ q.t())  # the exact decoded product


@pytest.mark.parametrize("cfg", FAST)
@pytest.mark.parametrize("shape", [(17, 131), (70, 200)], ids=_shape_id)
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_triton_kernels_equal_decode_then_matmul(triton_matmul, stored, cfg, shape, tokens):
    st, q = stored(cfg, shape)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens))
    _close(triton_matmul(x.to(KDEV), st.to(KDEV).layout()).cpu(), x @ q.t(), mag=_mag(x, q))


def test_triton_half_precision_tiles(triton_matmul, stored):
    st, q = stored(BiLLMConfig(blocksize=32), (40, 96))
    x = torch.randn(20, 96).half()
    ref = x.float() @ q.t()
    _close(triton_matmul(x.to(KDEV), st.to(KDEV).layout()).cpu(), ref, tol=2e-2)  # fp16 tiles, fp32 accumulation


def test_aligned_layouts_share_the_stored_planes(stored):
    st, _ = stored(BiLLMConfig(blocksize=32), (9, 64))
    lay = st.layout()
    assert lay.s1 is st.tensors["signs"] and lay.scales.dtype == torch.float16  # no copy of the first plane
    st, _ = stored(GPTQConfig(bits=2, groupsize=16), (9, 64))
    assert st.layout()[0].planes is st.tensors["codes"]
    st, _ = stored(GPTQConfig(bits=2, groupsize=12), (9, 60))
    assert st.layout()[0].planes is not st.tensors["codes"]  # groups off bytes: re-laid out


def test_auto_path_choice():
    x1, xp = torch.randn(1, 1, 8), torch.randn(1, LUT_MAX_TOKENS + 1, 8)
    assert choose_path("auto", x1, True) == "lut"
    assert choose_path("auto", xp, True) == "dequant"
    assert choose_path("auto", x1, False) == "dequant"  # no fast layout
    assert choose_path("dequant", x1, True) == "dequant"
    assert choose_path("lut", xp, True) == "lut"
    assert choose_path("auto", x1.requires_grad_(), True) == "dequant"  # gradients need the decoded weight


def test_environment_and_set_kernel(monkeypatch, stored):
    st, q = stored(BiLLMConfig(blocksize=32), (17, 131))
    layer = billm.PackedLinear.from_stored(st)
    x = torch.randn(1, 131)
    monkeypatch.setenv("BILLM_KERNEL", "dequant")
    assert torch.equal(layer(x), x @ q.t())
    monkeypatch.setenv("BILLM_KERNEL", "fastest")
    with pytest.raises(BillmError, match="unknown kernel 'fastest'"):
        layer(x)
    monkeypatch.delenv("BILLM_KERNEL")
    with pytest.raises(BillmError, match="unknown kernel"):
        set_kernel(layer, "cuda")
    assert set_kernel(torch.nn.Sequential(layer), "lut") == 1 and layer.kernel == "lut"
    _close(layer(x), x @ q.t())


def test_layout_follows_the_buffers(stored):
    st, q = stored(RTNConfig(bits=2), (8, 32))
    layer = billm.PackedLinear.from_stored(st)
    x = torch.randn(1, 32)
    _close(layer(x), x @ q.t())
    st2, q2 = stored(RTNConfig(bits=2), (8, 32), seed=1)
    layer.load_state_dict({f"packed_{k}": v.clone() for k, v in st2.tensors.items()}, assign=True)
    _close(layer(x), x @ q2.t())  # not the stale planes of the old buffers


@pytest.mark.parametrize("cfg", [BiLLMConfig(blocksize=16), SliMConfig(bits=2, groupsize=16)], ids=["billm", "slim"])
def test_a_loaded_model_decodes_tokens_through_the_lookup_path(tiny_model, cfg, tmp_path):
    model = tiny_model("llama", 0)
    calib = torch.randint(3, 120, (4, 32), generator=torch.Generator().manual_seed(0))
    rep = billm.quantize(model, calib, cfg, progress=False)
    billm.save(model, tmp_path / "ck", report=rep)
    loaded = billm.load(tmp_path / "ck")
    ids = torch.randint(3, 120, (1, 12))
    with torch.no_grad():
        set_kernel(loaded, "dequant")
        ref = loaded(ids).logits
        set_kernel(loaded, "auto")
        out = loaded.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        set_kernel(loaded, "dequant")
        out_ref = loaded.generate(ids, max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
        set_kernel(loaded, "lut")
        _close(loaded(ids).logits, ref, tol=1e-4)
    for a, b in zip(out.logits, out_ref.logits):
        _close(a, b, tol=1e-4)
