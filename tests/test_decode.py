"""The byte-table decoder (``billm.kernels.decode``) against each format's own decode: the same bits.

The ``dense`` path multiplies by this decoder's weight, so it must be the format's weight exactly
(``torch.equal``), for every format with a layout, odd shapes, blocks and groups off byte
boundaries, fp8 / fp32 scales, and any chunking of the rows.
"""

import pytest
import torch

import billm.kernels.decode as dec
from billm import BiLLMConfig, GPTQConfig, RTNConfig, SignConfig, SliMConfig
from billm.kernels.decode import can_decode, decode_weight, lookup
from billm.kernels.layout import GridPlanes
from billm.methods import get_method

EXACT = [
    pytest.param(BiLLMConfig(blocksize=32), id="billm-b32"),
    pytest.param(BiLLMConfig.reference(blocksize=20), id="billm-reference-b20"),  # centred, blocks off bytes
    pytest.param(BiLLMConfig(blocksize=16, salient_order=1, centred=True), id="billm-b16-salient1-centred"),
    pytest.param(BiLLMConfig(blocksize=32, scale_dtype="float8_e4m3fn"), id="billm-b32-fp8-scales"),
    pytest.param(BiLLMConfig(blocksize=32, scale_dtype="float32", centred=True), id="billm-b32-fp32-centred"),
    pytest.param(RTNConfig(bits=2), id="rtn-w2"),
    pytest.param(RTNConfig(bits=4, groupsize=12), id="rtn-w4-g12"),
    pytest.param(RTNConfig(bits=3, groupsize=16), id="rtn-w3-g16"),
    pytest.param(GPTQConfig(bits=3, groupsize=16, blocksize=32), id="gptq-w3-g16"),
    pytest.param(GPTQConfig(bits=8, groupsize=32, blocksize=32), id="gptq-w8-g32"),
    pytest.param(SliMConfig(bits=2, groupsize=16, blocksize=32), id="slim-w2-g16"),
    pytest.param(SliMConfig(bits=3, groupsize=24, blocksize=24), id="slim-w3-g24"),
    pytest.param(SignConfig(), id="sign"),
    pytest.param(SignConfig(centred=True), id="sign-centred"),
]


@pytest.fixture(scope="module")
def stored(random_problem):
    def _stored(cfg, shape, seed=0):
        W, H = random_problem(*shape, seed=seed)
        return get_method(cfg.method)(W.clone(), H, cfg).stored

    return _stored


@pytest.mark.parametrize("cfg", EXACT)
@pytest.mark.parametrize("shape", [(17, 131), (5, 9), (70, 200), (1, 64)], ids=lambda s: "x".join(map(str, s)))
def test_decoder_gives_the_formats_weight_bit_for_bit(stored, cfg, shape):
    st = stored(cfg, shape)
    lay = st.layout()
    assert can_decode(lay)
    w = decode_weight(lay, shape[1])
    assert w.dtype == torch.float32 and w.stride(1) == 1  # rows may be padded (a view): BLAS reads them as they are
    assert torch.equal(w, st.decode())


@pytest.mark.parametrize("cfg", [BiLLMConfig.reference(blocksize=20), SliMConfig(bits=3, groupsize=24, blocksize=24)],
                         ids=["billm-reference-b20", "slim-w3-g24"])
@pytest.mark.parametrize("chunk", [1, 150, 10_000], ids=lambda c: f"chunk{c}")
def test_any_row_chunking_gives_the_same_weight(stored, cfg, chunk, monkeypatch):
    monkeypatch.setattr(dec, "CHUNK_ELEMENTS", chunk)  # 1: a row at a time; 150: chunks of 1 to a few rows
    st = stored(cfg, (37, 131))
    assert torch.equal(decode_weight(st.layout(), 131), st.decode())


def test_byte_tables_spread_bits_least_significant_first():
    b = torch.tensor([[0b00000101, 0b10000000]])
    assert lookup("sign", b).tolist() == [[1, -1, 1, -1, -1, -1, -1, -1] + [-1] * 7 + [1]]
    assert lookup("code1", b).tolist() == [[1, 0, 1, 0, 0, 0, 0, 0] + [0] * 7 + [1]]
    assert lookup("not1", b).tolist() == [[0, 1, 0, 1, 1, 1, 1, 1] + [1] * 7 + [0]]
    with pytest.raises(KeyError, match="no byte table 'nibble'"):
        lookup("nibble", b)


def test_decoder_refuses_what_it_cannot_decode_exactly(stored):
    st = stored(RTNConfig(bits=2), (8, 32))
    lay = st.layout()
    assert not can_decode([GridPlanes(lay[0].planes, lay[0].scale, lay[0].offset, 32, None, 32)])  # no exact values
    with pytest.raises(ValueError, match="without exact values"):
        decode_weight([GridPlanes(lay[0].planes, lay[0].scale, lay[0].offset, 32, None, 32)], 32)
    with pytest.raises(ValueError, match="cover 32 columns, the weight has 40"):
        decode_weight(lay, 40)
    assert not can_decode(None) and not can_decode([])
    with pytest.raises(ValueError, match="not a layout"):
        decode_weight([], 32)


@pytest.mark.parametrize("cfg", EXACT[:3] + EXACT[10:12] + EXACT[-1:], ids=lambda c: type(c).__name__)
def test_dense_path_multiplies_by_the_same_weight_as_dequant(stored, cfg):
    import billm

    st = stored(cfg, (70, 200))
    layer = billm.PackedLinear.from_stored(st)
    x = torch.randn(3, 100, 200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.kernel = "dequant"
        ref = layer(x)
        layer.kernel = "dense"
        y = layer(x)
        layer.kernel = None
        assert torch.equal(layer(x), y)  # auto: 300 tokens on the CPU take the dense path
    torch.testing.assert_close(y, ref, rtol=0, atol=0)  # the same weight bits, the same F.linear


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad", "grad"])
def test_chunks_decoded_on_threads_keep_the_callers_mode(stored, mode, monkeypatch):
    # perplexity() runs under inference_mode, which is thread-local: the decode threads must run under it too
    monkeypatch.setattr(dec, "CHUNK_ELEMENTS", 512)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        st = stored(BiLLMConfig(blocksize=32), (64, 128))
        ctx = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "grad": torch.enable_grad}[mode]
        with ctx():
            w = decode_weight(st.layout(), 128)
        assert torch.equal(w, st.decode()) and w.is_inference() == (mode == "inference_mode")
    finally:
        torch.set_num_threads(torch_threads)
