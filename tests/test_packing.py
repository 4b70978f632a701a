"""Bit packing, stored forms, PackedLinear and the checkpoint folder (save, load, inspect, bad files)."""

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import billm
from billm import ArbConfig, BiLLMConfig, GPTQConfig, PBLLMConfig, RTNConfig, SignConfig, SliMConfig
from billm.errors import CheckpointError
from billm.methods import get_method
from billm.packing.formats import get_format
from billm.packing.linear import PackedLinear, decode_once
from billm.packing import pack_bits, pack_codes, unpack_bits, unpack_codes
from billm.packing.checkpoint import QUANT_MAP, WEIGHTS, inspect, load, read_header, save, tensor_sha256

from conftest import FAMILIES, random_problem, tiny_model

ODD_SHAPES = [(1, 1), (3, 7), (5, 9), (17, 131), (8, 64), (2, 1000)]

CONFIGS = [
    BiLLMConfig(blocksize=32),
    BiLLMConfig.reference(blocksize=48),
    BiLLMConfig(blocksize=32, salient_order=1, centred=True),
    RTNConfig(bits=2),
    RTNConfig(bits=3, groupsize=24),
    GPTQConfig(bits=4, groupsize=32, blocksize=32),
    GPTQConfig(bits=3, groupsize=16, act_order=True, blocksize=32),
    SignConfig(),
    SignConfig(obc=False, centred=True),
    PBLLMConfig(blocksize=32),
    PBLLMConfig(blocksize=32, salient_bits=4, salient_fraction=0.2),
    BiLLMConfig(blocksize=32, scale_dtype="float8_e4m3fn"),
    BiLLMConfig.plus(blocksize=32),
    SliMConfig(bits=2, groupsize=16, blocksize=32),
    SliMConfig(bits=3, groupsize=8, blocksize=16, sqc=False),
    ArbConfig(blocksize=32),
    ArbConfig(variant="x", blocksize=32),
    BiLLMConfig.plus(blocksize=32, split="column", scale_dtype="float8_e4m3fn"),
]
CONFIG_IDS = ["billm-b32", "billm-reference-b48", "billm-b32-salient1-centred", "rtn-w2", "rtn-w3-g24",
              "gptq-w4-g32", "gptq-w3-g16-act-order", "sign", "sign-no-obc-centred", "pbllm",
              "pbllm-salient4-f0.2", "billm-b32-fp8-scales", "billm-plus-b32", "slim-w2-g16", "slim-w3-g8-no-sqc",
              "arb-rc-b32", "arb-x-b32", "billm-plus-b32-column-split-fp8"]
assert len(CONFIG_IDS) == len(CONFIGS)


# ----------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("shape", ODD_SHAPES + [(2, 3, 13), (0, 5)])
def test_pack_bits_round_trip(shape):
    x = torch.rand(shape) > 0.5
    p = pack_bits(x)
    assert p.dtype == torch.uint8 and p.shape == shape[:-1] + ((shape[-1] + 7) // 8,)
    assert torch.equal(unpack_bits(p, shape[-1]), x)


def test_pack_bits_layout_is_lsb_first_along_the_input_dimension():
    x = torch.tensor([[True, False, False, False, False, False, False, False, False, True]])
    assert pack_bits(x).tolist() == [[1, 2]]  # bit 0 of byte 0, bit 1 of byte 1; padding bits are 0


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(3, 7), (17, 131), (9,)])
def test_pack_codes_round_trip(bits, shape):
    c = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    planes = pack_codes(c, bits)
    assert planes.shape == (bits,) + shape[:-1] + ((shape[-1] + 7) // 8,)
    assert torch.equal(unpack_codes(planes, shape[-1]), c)


def test_packing_rejects_bad_input():
    with pytest.raises(TypeError):
        pack_bits(torch.zeros(3))
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 17)
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([4]), 2)


# ----------------------------------------------------------------------------- stored forms

@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shape", [(17, 131), (5, 9), (24, 200)])
def test_stored_form_decodes_to_the_simulated_weights_exactly(cfg, shape):
    W, H = random_problem(*shape)
    res = get_method(cfg.method)(W.clone(), H.clone(), cfg)
    st = res.stored
    assert st is not None and st.shape == shape
    assert set(st.tensors) == set(st.fields())
    for name, spec in st.fields().items():
        assert tuple(st.tensors[name].shape) == spec.shape and st.tensors[name].dtype == spec.dtype, name
    assert torch.equal(st.decode(), res.q)
    # storage bits are the stored bytes (and the map's share), and always pay for more than the code bits
    assert st.storage_bits == (st.nbytes + get_format(st.format).map_bytes(st.meta)) * 8 / (shape[0] * shape[1])
    assert st.storage_bits > st.weight_bits >= 1.0


def test_scales_are_stored_in_fp16_and_used_as_stored():
    W, H = random_problem(16, 64)
    res = get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=32))
    assert res.stored.tensors["scales"].dtype == torch.float16
    ref = get_method("billm")(W.clone(), H.clone(), BiLLMConfig.reference(blocksize=32))
    assert ref.stored.tensors["scales"].dtype == torch.float32  # the reference keeps its exact fp32 arithmetic


def test_scale_overflowing_fp16_is_a_clear_error():
    W, H = random_problem(4, 16)
    with pytest.raises(billm.QuantizationError, match="overflows"):
        get_method("sign")(W * 1e6, None, SignConfig(obc=False))
    assert get_method("sign")(W * 1e6, None, SignConfig(obc=False, scale_dtype="float32")).stored is not None


def test_packed_linear_matches_nn_linear_with_decoded_weights():
    W, H = random_problem(12, 40)
    res = get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=16))
    bias = torch.randn(12)
    layer = billm.PackedLinear.from_stored(res.stored, bias)
    x = torch.randn(3, 5, 40)
    layer.kernel = "dequant"  # exact; the fast paths agree to float rounding (tests/test_kernels.py)
    assert torch.equal(layer(x), nn.functional.linear(x, res.q, bias))
    assert torch.equal(layer.weight, res.q)
    assert layer(x.double()).dtype == torch.float64  # decoded in the input's dtype



def test_decode_once_gives_the_same_outputs_and_then_lets_the_copy_go():
    W, H = random_problem(12, 40)
    layer = billm.PackedLinear.from_stored(get_method("billm")(W.clone(), H.clone(), BiLLMConfig(blocksize=16)).stored,
                                           torch.randn(12))
    layer.kernel = "dequant"
    xs = [torch.randn(2, 5, 40) for _ in range(3)]
    plain = [layer(x) for x in xs]
    with decode_once([layer]):
        assert layer._decoded is not None
        kept = layer._decoded.clone()
        layer._decoded.add_(1.0)  # the copy is what the calls use: changing it changes them
        assert not torch.equal(layer(xs[0]), plain[0])
        layer._decoded.copy_(kept)
        assert all(torch.equal(layer(x), y) for x, y in zip(xs, plain))
    assert layer._decoded is None and torch.equal(layer(xs[1]), plain[1])
    w = layer.stored().decode()
    layer.keep_decoded(w)  # a copy already made (quantize's check) is used as it is, then let go
    with decode_once([layer]):
        assert layer._decoded is w and torch.equal(layer(xs[2]), plain[2])
    assert layer._decoded is None
    layer.keep_decoded(w)
    layer.to("cpu")  # any move drops it: it would not follow the buffers
    assert layer._decoded is None
    half = layer.to(torch.float16)  # a copy kept in the inputs' dtype: the same outputs, half the memory
    half.keep_decoded(w.half())
    x16 = xs[2].half()
    with decode_once([half]):
        assert half(x16).dtype == torch.float16
        assert torch.equal(half(x16), F.linear(x16, w.half(), None if half.bias is None else half.bias.half()))
        bias = None if half.bias is None else half.bias.float()  # float32 inputs: decoded anew, not the fp16 copy
        assert torch.equal(half(xs[2]), F.linear(xs[2], w, bias))
    for bad in (w.to(torch.int32), w[:1]):
        with pytest.raises(ValueError, match="keep_decoded"):
            layer.keep_decoded(bad)

# ----------------------------------------------------------------------------- checkpoint round trip

def _quantized(family, cfg, seed=0):
    model = tiny_model(family, seed)
    g = torch.Generator().manual_seed(seed)
    calib = torch.randint(3, 120, (4, 32), generator=g)
    report = billm.quantize(model, calib, cfg, progress=False)
    return model, report


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_logits_every_family(family, quantized_tiny, tmp_path):
    model, report = quantized_tiny(family, BiLLMConfig(blocksize=32))
    out = save(model, tmp_path / "ck", report=report)
    loaded = load(out)
    ids = torch.randint(3, 120, (2, 24))
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() <= 1e-4
    packed = [m for m in loaded.modules() if isinstance(m, billm.PackedLinear)]
    assert len(packed) == len(report.layers)
    assert not any(isinstance(m, nn.Linear) and m.weight.shape[0] * m.weight.shape[1] in
                   {r.shape[0] * r.shape[1] for r in report.layers} and "lm_head" not in n
                   for n, m in loaded.named_modules() if n.startswith(report.layers[0].name.split(".0.")[0]))


@pytest.mark.parametrize("cfg", CONFIGS[3:], ids=CONFIG_IDS[3:])
def test_round_trip_logits_every_method(cfg, quantized_tiny, tmp_path):
    model, report = quantized_tiny("opt", cfg.replace(blocksize=32))  # OPT: biases on every linear
    loaded = load(save(model, tmp_path / "ck", report=report))
    ids = torch.randint(3, 120, (2, 24))
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() <= 1e-4


def test_gpt2_conv1d_and_tied_embeddings(quantized_tiny, tmp_path):
    model, report = quantized_tiny("gpt2", BiLLMConfig(blocksize=32))
    out = save(model, tmp_path / "ck", report=report)
    qmap = json.loads((out / QUANT_MAP).read_text())
    assert qmap["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert {layer["module"] for layer in qmap["layers"].values()} == {"Conv1D"}
    loaded = load(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(3, 120, (1, 16))
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() <= 1e-4


def test_fp16_checkpoint_runs_in_fp16(quantized_tiny, tmp_path):
    model, report = quantized_tiny("llama", BiLLMConfig(blocksize=32))
    model = copy.deepcopy(model)  # cast to fp16 below
    out = save(model, tmp_path / "ck", report=report, dtype=torch.float16)
    loaded = load(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    half = model.to(torch.float16)  # the packed buffers keep their dtypes; only the rest is cast
    for r in report.layers:
        assert torch.equal(loaded.get_submodule(r.name).weight, half.get_submodule(r.name).weight)
    ids = torch.randint(3, 120, (1, 16))
    # (logits differ only by fp16 rounding: model.to(fp16) also casts the rotary buffer, the loader keeps it fp32)
    torch.testing.assert_close(_logits(loaded, ids), _logits(half, ids), atol=5e-3, rtol=0)
    assert load(out, dtype=torch.float32).model.embed_tokens.weight.dtype == torch.float32


def test_inspect_measures_the_file(quantized_tiny, tmp_path):
    model, report = quantized_tiny("llama", BiLLMConfig(blocksize=32))
    out = save(model, tmp_path / "ck", report=report)
    info = inspect(out)
    assert info.file_bytes == (out / WEIGHTS).stat().st_size
    assert info.file_bytes == info.header_bytes + info.other_bytes + sum(l.nbytes for l in info.layers)
    assert info.n_params == sum(p.numel() for p in tiny_model("llama").parameters())
    assert set(info.bytes_by_kind()) == {"signs", "salient 2nd signs", "group bitmap", "salient-column mask", "scales"}
    assert info.weight_bits == pytest.approx(report.weight_bits)
    # one definition: the report (from the modules' buffers) and inspect (from the file's header) agree exactly
    assert [l.storage_bits for l in info.layers] == [r.storage_bits for r in report.layers]
    assert json.loads((out / QUANT_MAP).read_text())["storage_bits"] == pytest.approx(info.storage_bits)


# ----------------------------------------------------------------------------- bad files and folders

@pytest.fixture(scope="module")
def saved_checkpoint(quantized_tiny, tmp_path_factory):
    model, report = quantized_tiny("llama", BiLLMConfig(blocksize=32))
    return save(model, tmp_path_factory.mktemp("saved") / "ck", report=report)


@pytest.fixture
def checkpoint(saved_checkpoint, tmp_path):
    """A copy of the saved tiny LLaMA checkpoint, for the test to damage."""
    return Path(shutil.copytree(saved_checkpoint, tmp_path / "ck"))


def _rewrite_map(folder, fn):
    p = folder / QUANT_MAP
    d = json.loads(p.read_text())
    fn(d)
    p.write_text(json.dumps(d))


def test_truncated_file_names_the_file(checkpoint):
    f = checkpoint / WEIGHTS
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load(checkpoint)
    f.write_bytes(f.read_bytes()[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load(checkpoint)


def test_bit_flip_is_caught_by_the_checksum_and_names_the_tensor(checkpoint):
    f = checkpoint / WEIGHTS
    header = read_header(f)
    name = "model.layers.1.mlp.down_proj.packed_signs"
    data = bytearray(f.read_bytes())
    data[header[name].start + 3] ^= 0x10
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{name}.*corrupt"):
        load(checkpoint)


def test_corrupt_header(checkpoint):
    f = checkpoint / WEIGHTS
    data = bytearray(f.read_bytes())
    data[10] = ord("#")
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        load(checkpoint)


def test_newer_format_version_is_refused(checkpoint):
    _rewrite_map(checkpoint, lambda d: d.update(format_version=99))
    with pytest.raises(CheckpointError, match="format_version 99 is newer"):
        load(checkpoint)


def test_incomplete_folder_is_never_loaded(checkpoint):
    (checkpoint / QUANT_MAP).unlink()
    with pytest.raises(CheckpointError, match="not a complete billm checkpoint"):
        load(checkpoint)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load(checkpoint / "nope")


def test_wrong_shape_names_file_and_tensor(checkpoint):
    from safetensors.torch import load_file, save_file

    f = checkpoint / WEIGHTS
    sd = load_file(str(f))
    name = "model.layers.0.self_attn.q_proj.packed_scales"
    sd[name] = torch.zeros(1, 2, 3, dtype=torch.float16)
    save_file(sd, str(f))
    _rewrite_map(checkpoint, lambda d: d["files"][WEIGHTS]["sha256"].update({name: tensor_sha256(sd[name])}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor '{name}' has shape \[1, 2, 3\]"):
        load(checkpoint)


def test_missing_tensor_is_named(checkpoint):
    from safetensors.torch import load_file, save_file

    f = checkpoint / WEIGHTS
    sd = load_file(str(f))
    del sd["model.norm.weight"]
    save_file(sd, str(f))
    with pytest.raises(CheckpointError, match="'model.norm.weight' is missing"):
        load(checkpoint)


def test_map_naming_a_layer_the_model_lacks(checkpoint):
    _rewrite_map(checkpoint, lambda d: d["layers"].update(
        {"model.layers.7.mlp.up_proj": d["layers"]["model.layers.0.mlp.up_proj"]}))
    with pytest.raises(CheckpointError, match="model.layers.7.mlp.up_proj does not exist"):
        load(checkpoint)


def test_save_refuses_foreign_folders_and_failures_leave_nothing(quantized_tiny, tmp_path, monkeypatch):
    model, report = quantized_tiny("llama", BiLLMConfig(blocksize=32))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(billm.BillmError, match="refusing to overwrite"):
        save(model, mine, report=report)
    assert (mine / "notes.txt").read_text() == "keep"

    import billm.packing.checkpoint as ck

    def full_disk(path, *a, **k):
        Path(path).write_bytes(b"half a file")
        raise OSError("No space left on device")

    monkeypatch.setattr(ck, "write_safetensors", full_disk)
    with pytest.raises(OSError, match="No space"):
        save(model, tmp_path / "out", report=report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial folder, no temp left


def test_save_replaces_a_previous_checkpoint_atomically(quantized_tiny, tmp_path):
    model, report = quantized_tiny("llama", BiLLMConfig(blocksize=32))
    out = save(model, tmp_path / "ck", report=report)
    model2, report2 = _quantized("llama", RTNConfig(bits=2), seed=1)
    save(model2, out, report=report2)
    assert json.loads((out / QUANT_MAP).read_text())["method"] == "rtn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    ids = torch.randint(3, 120, (1, 12))
    assert (_logits(load(out), ids) - _logits(model2, ids)).abs().max() <= 1e-4


def test_header_length_field_beyond_the_file(checkpoint):
    f = checkpoint / WEIGHTS
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        inspect(checkpoint)


def test_load_model_refuses_a_billm_folder_without_its_map(checkpoint):
    from billm.model.loading import load_model

    (checkpoint / QUANT_MAP).unlink()  # config.json still says quant_method billm: never load it as a plain model
    with pytest.raises(CheckpointError, match="not a complete billm checkpoint"):
        load_model(checkpoint)


def test_format_version_1_folders_still_load_and_save_again(checkpoint, tmp_path):
    # version 1 recorded a formula's storage bits and no method config in config.json
    def to_v1(d):
        d["format_version"] = 1
        d["storage_bits_rule"] = d.pop("storage_bits")
        for layer in d["layers"].values():
            layer["storage_bits_rule"] = layer.pop("storage_bits")

    _rewrite_map(checkpoint, to_v1)
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "billm", "method": "billm", "format_version": 1}
    cfg["model_type"] = cfg.pop("billm_model_type")  # nor was config.json guarded
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    model = load(checkpoint)
    info = inspect(checkpoint)
    assert info.storage_bits > info.weight_bits > 1
    again = save(model, tmp_path / "again")  # the config comes back from the map
    assert json.loads((again / QUANT_MAP).read_text())["format_version"] == billm.packing.checkpoint.FORMAT_VERSION
    ids = torch.randint(3, 120, (1, 12))
    assert torch.equal(_logits(load(again), ids), _logits(model, ids))


def test_streamed_safetensors_are_the_bytes_safetensors_writes(tmp_path):
    from safetensors.torch import save_file

    from billm.packing.checkpoint import write_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {"z.scales": torch.randn(3, 5, generator=g).half(), "a.weight": torch.randn(4, 2, generator=g),
               "m.packed_signs": torch.randint(0, 256, (7, 3), dtype=torch.uint8, generator=g),
               "mask": torch.rand(5, generator=g) > 0.5, "idx": torch.arange(6, dtype=torch.int32),
               "bf": torch.randn(2, generator=g).bfloat16(), "f8": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
               "empty": torch.zeros(0, 4), "i8": torch.ones(3, dtype=torch.int8), "f64": torch.randn(2).double(),
               "i64": torch.arange(3), "scalar": torch.tensor(2.5), "strided": torch.randn(4, 6, generator=g)[:, ::2]}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "lib.safetensors"), metadata={"format": "pt"})
    asked = []
    sums = write_safetensors(tmp_path / "mine.safetensors", {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()},
                             lambda k: asked.append(k) or tensors[k], {"format": "pt"})
    assert (tmp_path / "mine.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()
    assert sorted(asked) == sorted(tensors)  # each read once
    assert sums == {k: tensor_sha256(v) for k, v in tensors.items()}
    with pytest.raises(billm.CheckpointError, match="expected torch.float16"):
        write_safetensors(tmp_path / "bad.safetensors", {"x": (torch.float16, (2,))}, lambda k: torch.zeros(2), {})


def test_a_model_held_empty_saves_the_same_bytes_from_its_source(quantized_tiny, tmp_path):
    model, report = quantized_tiny("llama", BiLLMConfig(blocksize=32))
    whole = save(model, tmp_path / "whole", report=report)
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    empty = copy.deepcopy(model)
    for layer in [m for m in empty.modules() if isinstance(m, PackedLinear)][::2] + [empty.model.embed_tokens]:
        layer.to("meta")  # half the packed layers, and the embeddings, on meta
    with pytest.raises(billm.CheckpointError, match="no source"):
        save(empty, tmp_path / "nothing")
    asked = []
    streamed = save(empty, tmp_path / "streamed", report=report, source=lambda k: asked.append(k) or kept[k])
    for f in (WEIGHTS, QUANT_MAP, "config.json"):
        assert (streamed / f).read_bytes() == (whole / f).read_bytes(), f
    assert "model.embed_tokens.weight" in asked and any(".packed_" in k for k in asked)
