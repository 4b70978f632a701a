"""Several devices at once: calibration batches and a block's linears spread over a device list give the
same bytes as one device (checked with CPU device lists; the code path is the one CUDA lists take)."""

import hashlib

import pytest
import torch

import billm
from billm import BiLLMConfig, GPTQConfig, SliMConfig
from billm.errors import BillmError
from billm.driver import parse_devices

CALIB = torch.randint(3, 120, (6, 32), generator=torch.Generator().manual_seed(0))


def _sha(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: per-layer masks replayed on every replica
@pytest.mark.parametrize("cfg", [BiLLMConfig(blocksize=32), GPTQConfig(bits=2, groupsize=32, blocksize=32),
                                 SliMConfig(bits=2, groupsize=16, blocksize=32)], ids=["billm", "gptq", "slim"])
def test_a_device_list_writes_the_same_bytes_as_one_device(family, cfg, tiny_model, tmp_path):
    shas, reports = [], []
    for k, device in enumerate([None, "cpu,cpu", ["cpu", "cpu", "cpu"]]):
        model = tiny_model(family)
        reports.append(billm.quantize(model, CALIB, cfg, progress=False, batch_size=2, device=device))
        shas.append(_sha(billm.save(model, tmp_path / f"q{k}")))
    assert shas[0] == shas[1] == shas[2]
    # one device frees a Hessian's last user's H and takes its error figure from the factor: equal up to rounding
    assert [r.hessian_rel_err for r in reports[0].layers] == \
        pytest.approx([r.hessian_rel_err for r in reports[2].layers], rel=1e-4)


def test_cli_device_list(tiny_config, byte_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from billm.cli import main

    cfg = tiny_config("llama")
    cfg.vocab_size = 260
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    byte_tokenizer(model_max_length=256).save_pretrained(tmp_path / "m")
    argv = ["quantize", str(tmp_path / "m"), "--calib", "pydoc", "--nsamples", "4", "--seqlen", "32", "--batch-size",
            "1", "--quiet", "--eval", "pydoc", "--max-windows", "1"]
    assert main([*argv, "--out", str(tmp_path / "one")]) == 0
    assert main([*argv, "--out", str(tmp_path / "two"), "--device", "cpu,cpu"]) == 0
    assert _sha(tmp_path / "one") == _sha(tmp_path / "two")


def test_device_lists_parse_and_bad_names_are_clear_errors():
    assert parse_devices("cpu, cpu") == [torch.device("cpu")] * 2
    assert parse_devices(None) == []
    assert parse_devices(torch.device("cpu")) == [torch.device("cpu")]
    with pytest.raises(BillmError, match="bad device list"):
        parse_devices("cpu,gpu7")
