"""Block reconstruction (billm.reconstruct): the stored scales and means of a quantized block tuned toward the
full-precision block's output, in their stored dtype, seeded, a no-op where nothing is tunable."""

import copy
import dataclasses

import pytest
import torch

import billm
from billm import BiLLMConfig, GPTQConfig
from billm.packing import formats
from billm.packing.linear import PackedLinear
from billm.reconstruct import Settings, reconstruct_block, select_rows, straight_through, tunable_fields


def _packed(block):
    return {n: m for n, m in block.named_modules() if isinstance(m, PackedLinear)}


def _buffers(block):
    return {f"{n}.{k}": v.clone() for n, m in _packed(block).items() for k, v in m.stored().tensors.items()}


def _block_error(block, hidden, kwargs, targets):
    """Relative squared error |out - target|^2 / |target|^2 of the block over every calibration batch."""
    num = den = 0.0
    with torch.no_grad():
        for h, kw, t in zip(hidden, kwargs, targets):
            out = block(h.clone(), **kw)
            out = out[0] if isinstance(out, (tuple, list)) else out
            num += float((out - t).pow(2).sum())
            den += float(t.pow(2).sum())
    return num / den


@pytest.mark.parametrize("spec", ["billm", "billm:tiny", "billm:tiny+hadamard", "sign:centred", "gptq:w2g32",
                                  "rtn:w2g32", "pbllm", "arb", "lowrank:r8"])
def test_reconstruction_lowers_the_block_output_error(quantized_block, spec):
    block, hidden, kwargs, targets = quantized_block(spec)
    before = _block_error(block, hidden, kwargs, targets)
    stats = reconstruct_block(block, hidden, kwargs, targets, Settings(steps=40, lr=1e-2, batch=2), torch.device("cpu"))
    after = _block_error(block, hidden, kwargs, targets)
    assert stats.steps == 40 and stats.values > 0
    assert after < 0.95 * before, (spec, before, after)


@pytest.mark.parametrize("spec", ["billm:tiny", "billm", "billm:reference"])  # fp8, fp16, fp32 scales
def test_tuned_fields_keep_their_stored_dtype_and_the_layer_decodes_to_them(quantized_block, spec):
    block, hidden, kwargs, targets = quantized_block(spec)
    old = _buffers(block)
    reconstruct_block(block, hidden, kwargs, targets, Settings(steps=5, lr=1e-2, batch=2), torch.device("cpu"))
    new = _buffers(block)
    assert {k: (v.dtype, v.shape) for k, v in old.items()} == {k: (v.dtype, v.shape) for k, v in new.items()}
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    assert changed and all(old[k].is_floating_point() for k in changed)  # only scales / means moved, never bits
    for m in _packed(block).values():  # the module's forward uses exactly its stored form
        x = torch.randn(3, m.in_features)
        st = m.stored()
        w = st.decode()
        rot = billm.packing.rotation.Rotation.of(st)
        ref = (x if rot is None else rot.input(x)) @ w.T
        m.kernel = "dequant"
        assert torch.equal(m(x), ref)


def test_same_seed_same_bytes_other_seed_other_bytes(quantized_block):
    block, hidden, kwargs, targets = quantized_block("billm:tiny")
    runs = []
    for seed in (0, 0, 1):
        b = copy.deepcopy(block)
        reconstruct_block(b, hidden, kwargs, targets, Settings(steps=6, lr=1e-2, batch=2, seed=seed),
                          torch.device("cpu"))
        runs.append(_buffers(b))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_zero_steps_and_formats_without_tunable_fields_change_nothing(quantized_block, monkeypatch):
    block, hidden, kwargs, targets = quantized_block("sign")
    old = _buffers(block)
    assert reconstruct_block(block, hidden, kwargs, targets, Settings(steps=0), torch.device("cpu")).steps == 0
    monkeypatch.setitem(formats.FORMATS, "sign", dataclasses.replace(formats.get_format("sign"), tunable=()))
    assert reconstruct_block(block, hidden, kwargs, targets, Settings(steps=5), torch.device("cpu")).steps == 0
    new = _buffers(block)
    assert all(torch.equal(old[k], new[k]) for k in old)


def test_tunable_fields_default_to_the_floating_point_ones(quantized_block):
    block = quantized_block("gptq:w2g32")[0]
    st = next(iter(_packed(block).values())).stored()
    assert tunable_fields(st) == ["scales"]  # codes and zero points are integer bit planes


def test_straight_through_rounds_forward_exactly_and_passes_gradients():
    x = torch.tensor([0.1, -3.3, 1000.0, 1e-4], requires_grad=True)
    y = straight_through(x, torch.float8_e4m3fn)
    assert torch.equal(y.detach(), x.detach().clamp(-448, 448).to(torch.float8_e4m3fn).float())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4))


def test_select_rows_slices_per_sequence_tensors_only():
    kw = {"mask": torch.arange(4 * 5).reshape(4, 1, 5), "pos": torch.zeros(1, 5), "cache": torch.arange(4),
          "rope": (torch.ones(1, 5, 2), torch.ones(1, 5, 2)), "flag": True}
    out = select_rows(kw, torch.tensor([1, 3]), 4)
    assert torch.equal(out["mask"], kw["mask"][[1, 3]])
    assert out["pos"] is kw["pos"] and out["cache"] is kw["cache"] and out["flag"] is True  # 1-D: never a batch


# ----------------------------------------------------------------------------- the options and the driver

def test_options_are_spec_tokens_and_default_records_are_unchanged():
    c = BiLLMConfig.from_spec("tiny+hadamard+rec200+fpinputs")
    assert (c.reconstruct, c.reconstruct_target) == (200, "fpinputs")
    assert c.to_dict()["reconstruct"] == 200 and BiLLMConfig.from_dict(c.to_dict()) == c
    assert "reconstruct" not in BiLLMConfig.from_spec("tiny+rec0").to_dict()  # 0 = off: today's record, byte for byte
    assert GPTQConfig.from_spec("w2g128+rec50+reconstruct_lr=0.01").reconstruct_lr == 0.01
    with pytest.raises(billm.BillmError):
        BiLLMConfig(reconstruct=-1)


@pytest.mark.parametrize("target", ["qinputs", "fpinputs"])
def test_quantize_with_reconstruction_records_it_and_changes_only_scales(tiny_model, target):
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    models = [tiny_model("llama"), tiny_model("llama")]
    configs = [BiLLMConfig.from_spec("tiny+b32"), BiLLMConfig.from_spec(f"tiny+b32+rec8+{target}+reconstruct_lr=0.05")]
    reports = [billm.quantize(m, ids, c, batch_size=4, progress=False) for m, c in zip(models, configs)]
    rec = reports[1]
    assert rec.config["reconstruct"] == 8 and rec.config.get("reconstruct_target", "qinputs") == target
    assert models[1].config.quantization_config["config"]["reconstruct"] == 8  # what billm.save records
    assert "reconstruct" in rec.phases and "reconstruct" not in reports[0].phases
    assert all(r.info["reconstruct"]["steps"] == 8 for r in rec.layers)
    first = [_buffers(m.model.layers[0]) for m in models]  # block 0 sees the same inputs in both runs
    assert all(torch.equal(first[0][k], first[1][k]) for k in first[0] if not first[0][k].is_floating_point())
    assert any(not torch.equal(first[0][k], first[1][k]) for k in first[0])


# every spec whose format declares sign planes (Format.signs), at each salient order / stored layout
SIGN_SPECS = {"lowrank:r8": ("u", "v"), "billm:tiny": ("signs", "signs2"), "billm:salient_order=1+centred": ("signs",),
              "billm:tiny+hadamard": ("signs", "signs2")}


@pytest.mark.parametrize("spec", SIGN_SPECS)
def test_the_sign_planes_decode_is_the_formats_decode_bit_for_bit(quantized_block, spec):
    block = quantized_block(spec)[0]
    for m in _packed(block).values():
        st = m.stored()
        planes = formats.get_format(st.format).signs
        bits = planes.unpack(st.tensors, st.shape, st.meta)
        assert set(bits) == set(SIGN_SPECS[spec])
        decoded = planes.decode(st.tensors, {f: formats.pm1(b) for f, b in bits.items()}, st.shape, st.meta)
        assert torch.equal(decoded.view(torch.int32), st.decode().view(torch.int32))  # -0.0 and 0.0 alike
        repacked = planes.pack(bits, st.shape, st.meta)
        assert set(repacked) == set(bits) and all(torch.equal(repacked[f], st.tensors[f]) for f in bits)


@pytest.mark.parametrize("spec", ["lowrank:r8", "billm:tiny"])
def test_sign_latents_flip_signs_lower_the_error_and_the_stored_signs_are_the_tuned_ones(quantized_block, spec):
    block, hidden, kwargs, targets = quantized_block(spec)
    scales_only = copy.deepcopy(block)
    before = _block_error(block, hidden, kwargs, targets)
    old = _buffers(block)
    stats = reconstruct_block(block, hidden, kwargs, targets, Settings(steps=60, lr=1e-2, batch=2, signs=True,
                                                                       sign_lr=0.05), torch.device("cpu"))
    reconstruct_block(scales_only, hidden, kwargs, targets, Settings(steps=60, lr=1e-2, batch=2), torch.device("cpu"))
    new = _buffers(block)
    fields = tuple(f".{f}" for f in SIGN_SPECS[spec])
    assert stats.signs == sum(b.numel() for m in _packed(block).values() for b in formats.get_format(
        m.format).signs.unpack(m.stored().tensors, m.shape, m.meta).values())
    assert 0 < stats.flipped < stats.signs
    flipped_planes = {k for k in old if k.endswith(fields) and not torch.equal(old[k], new[k])}
    assert flipped_planes and all(old[k].dtype == torch.uint8 for k in flipped_planes)
    after = _block_error(block, hidden, kwargs, targets)
    assert after < 0.95 * before
    unchanged = _buffers(scales_only)  # without signs=True not one sign byte moves
    assert all(torch.equal(old[k], unchanged[k]) for k in old if k.endswith(fields))


def test_sign_latents_change_nothing_for_a_format_without_sign_planes(quantized_block):
    runs = []
    for signs in (False, True):
        block, hidden, kwargs, targets = quantized_block("gptq:w2g32")
        stats = reconstruct_block(block, hidden, kwargs, targets, Settings(steps=5, lr=1e-2, batch=2, signs=signs),
                                  torch.device("cpu"))
        runs.append((_buffers(block), stats))
    (a, sa), (b, sb) = runs
    assert sb.signs == 0 and sb.flipped == 0 and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- end-to-end tuning (finetune)

def _calibration_loss(model, ids):
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def test_finetune_lowers_the_calibration_loss_and_changes_only_scales(tiny_model, tmp_path):
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(0))
    models = [tiny_model("llama"), tiny_model("llama")]
    configs = [BiLLMConfig.from_spec("tiny+b32"), BiLLMConfig.from_spec("tiny+b32+ft40+finetune_lr=0.05")]
    reports = [billm.quantize(m, ids, c, batch_size=4, progress=False) for m, c in zip(models, configs)]
    tuned = reports[1]
    assert tuned.finetune["steps"] == 40 and tuned.to_dict()["finetune"] == tuned.finetune
    assert tuned.finetune["loss_last"] < tuned.finetune["loss_first"]
    assert "finetune" in tuned.phases and "finetune" not in reports[0].to_dict()
    assert models[1].config.quantization_config["config"]["finetune"] == 40  # what billm.save records
    # the whole calibration text, not only the last mini-batches: the tuned model fits it better
    assert _calibration_loss(models[1], ids) < _calibration_loss(models[0], ids)
    bufs = [{f"{i}.{k}": v for i, block in enumerate(m.model.layers) for k, v in _buffers(block).items()} for m in models]
    assert all(torch.equal(bufs[0][k], bufs[1][k]) for k in bufs[0] if not bufs[0][k].is_floating_point())  # signs, bitmaps
    assert any(not torch.equal(bufs[0][k], bufs[1][k]) for k in bufs[0])
    assert {k: (v.dtype, v.shape) for k, v in bufs[0].items()} == {k: (v.dtype, v.shape) for k, v in bufs[1].items()}
    billm.save(models[1], tmp_path / "ck")  # the checkpoint holds exactly the tuned model
    with torch.no_grad():
        assert torch.equal(billm.load(tmp_path / "ck")(ids[:2]).logits, models[1](ids[:2]).logits)


def test_finetune_same_command_same_bytes(tiny_model):
    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = GPTQConfig.from_spec("w2g32+ft6")
    models = [tiny_model("llama"), tiny_model("llama")]
    for m in models:
        billm.quantize(m, ids, cfg, batch_size=4, progress=False)
    a, b = ({f"{i}.{k}": v for i, blk in enumerate(m.model.layers) for k, v in _buffers(blk).items()} for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_options_and_refusals(tiny_model):
    c = BiLLMConfig.from_spec("tiny+ft64+finetune_batch=2")
    assert (c.finetune, c.finetune_batch) == (64, 2) and BiLLMConfig.from_dict(c.to_dict()) == c
    assert "finetune" not in BiLLMConfig.from_spec("tiny+ft0").to_dict()  # 0 = off: today's record, byte for byte
    for bad in ({"finetune": -1}, {"finetune_lr": 0.0}, {"finetune_batch": 0}):
        with pytest.raises(billm.BillmError, match=next(iter(bad))):
            BiLLMConfig(**bad)
    model = tiny_model("llama")
    model.hf_device_map = {"model.embed_tokens": "cpu", "model.layers": "disk"}  # as accelerate dispatches it
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(billm.ModelError, match="finetune runs the whole model on one device"):
        billm.quantize(model, torch.randint(3, 128, (2, 16)), BiLLMConfig.from_spec("tiny+ft4"), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # refused before any work


def test_finetune_after_a_run_resumed_past_its_last_block_gives_the_same_bytes(tiny_model, tmp_path):
    from billm.resume import ProgressStore

    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(2))
    cfg = BiLLMConfig.from_spec("tiny+b32+ft6")
    first, again = tiny_model("llama"), tiny_model("llama")
    billm.quantize(first, ids, cfg, batch_size=4, progress=False, store=ProgressStore(tmp_path / "p", {"run": 1}))
    # every block is in the store (as after a kill during the tuning): the rerun replays them all, then tunes again
    rep = billm.quantize(again, ids, cfg, batch_size=4, progress=False, store=ProgressStore(tmp_path / "p", {"run": 1}))
    assert rep.resumed_blocks == len(again.model.layers) and rep.finetune["steps"] == 6
    a, b = ({f"{i}.{k}": v for i, blk in enumerate(m.model.layers) for k, v in _buffers(blk).items()} for m in (first, again))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_logits_put_another_stream_through_the_models_own_tail(tiny_model):
    from billm.reconstruct import teacher_logits

    model = tiny_model("llama")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    seen = []
    handle = model.model.layers[-1].register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                           else out))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    handle.remove()
    assert torch.equal(teacher_logits(model, model.model.layers[-1], ids, seen[0]), ref)
    other = teacher_logits(model, model.model.layers[-1], ids, torch.zeros_like(seen[0]))
    assert not torch.equal(other, ref)  # the stream given is the one used


def _kl_to(fp, model, ids):
    with torch.no_grad():
        log_p, log_q = (torch.log_softmax(m(input_ids=ids).logits.float(), -1) for m in (fp, model))
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


def test_finetune_toward_the_full_precision_model_lowers_its_kl(tiny_model, tmp_path):
    from billm.resume import ProgressStore

    ids = torch.randint(3, 128, (8, 32), generator=torch.Generator().manual_seed(5))
    fp = tiny_model("llama")
    plain, tuned, again = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    billm.quantize(plain, ids, BiLLMConfig.from_spec("tiny+b32"), batch_size=4, progress=False)
    cfg = BiLLMConfig.from_spec("tiny+b32+ft30+finetune_target=fp+finetune_lr=0.05")
    rep = billm.quantize(tuned, ids, cfg, batch_size=4, progress=False, store=ProgressStore(tmp_path / "p", {"r": 1}))
    assert rep.finetune["target"] == "fp" and rep.finetune["loss_last"] < rep.finetune["loss_first"]
    assert _kl_to(fp, tuned, ids) < _kl_to(fp, plain, ids)
    # the full-precision stream after the last block is in the store: a rerun past the last block tunes the same
    assert (tmp_path / "p" / "final.safetensors").is_file()
    billm.quantize(again, ids, cfg, batch_size=4, progress=False, store=ProgressStore(tmp_path / "p", {"r": 1}))
    a, b = ({f"{i}.{k}": v for i, blk in enumerate(m.model.layers) for k, v in _buffers(blk).items()} for m in (tuned, again))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # that stream is exactly the full-precision model's last-block output, batch by batch
    from safetensors.torch import load_file

    seen = []
    hook = fp.model.layers[-1].register_forward_hook(lambda m, args, out: seen.append(out[0] if isinstance(out, tuple)
                                                                                      else out))
    with torch.no_grad():
        for batch in ids.split(4):
            fp(input_ids=batch)
    hook.remove()
    final = load_file(str(tmp_path / "p" / "final.safetensors"))
    assert len(final) == len(seen) == 2 and all(torch.equal(final[f"fp{b}"], seen[b]) for b in range(2))
    # progress without that stream (written without the fp target) is refused, not tuned toward a stale stream
    (tmp_path / "p" / "final.safetensors").unlink()
    with pytest.raises(billm.QuantizationError, match="no full-precision stream.*--restart"):
        billm.quantize(tiny_model("llama"), ids, cfg, batch_size=4, progress=False,
                       store=ProgressStore(tmp_path / "p", {"r": 1}))


def test_block_reconstruction_on_the_fp_stream_alone_keeps_no_final_stream(tiny_model, tmp_path):
    from billm.resume import ProgressStore

    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(6))
    billm.quantize(tiny_model("llama"), ids, BiLLMConfig.from_spec("tiny+b32+rec2+fpinputs"), batch_size=4,
                   progress=False, store=ProgressStore(tmp_path / "p", {"r": 1}))
    assert (tmp_path / "p" / "done.json").is_file() and not (tmp_path / "p" / "final.safetensors").exists()
