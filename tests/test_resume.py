"""Reliability: resume after SIGKILL at any point, byte-identical output, determinism, clear early errors."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import billm
from billm.cli import main

REPO = Path(__file__).resolve().parents[1]
OUTPUT_FILES = ("model.safetensors", "billm_quant.json", "config.json", "tokenizer.json")


@pytest.fixture(scope="module")
def make_tiny_folder(tiny_config, byte_tokenizer):
    """``make_tiny_folder(path, layers=4, seed=0)``: a random tiny LLaMA and the byte tokenizer saved at ``path``."""
    from transformers import AutoModelForCausalLM

    def _tiny_folder(path, layers=4, seed=0):
        cfg = tiny_config("llama")
        cfg.vocab_size = 260
        cfg.num_hidden_layers = layers
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
        byte_tokenizer(model_max_length=256).save_pretrained(path)
        return path

    return _tiny_folder


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, make_tiny_folder):
    return make_tiny_folder(tmp_path_factory.mktemp("tiny4"))


def _argv(model, out, *extra):
    return ["quantize", str(model), "--calib", "pydoc", "--nsamples", "3", "--seqlen", "32", "--batch-size", "2",
            "--out", str(out), "--quiet", *extra]


def _run(argv, fault=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    env.pop("BILLM_FAULT_INJECT", None)
    if fault:
        env["BILLM_FAULT_INJECT"] = fault
    return subprocess.run([sys.executable, "-m", "billm", *argv], env=env, capture_output=True, text=True, timeout=timeout)


def _files(folder):
    return {name: (folder / name).read_bytes() for name in OUTPUT_FILES}


@pytest.fixture(scope="module")
def baseline(tiny4, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "q"
    r = _run(_argv(tiny4, out))
    assert r.returncode == 0, r.stderr
    return _files(out)


def _progress(out):
    return out.parent / f".{out.name}.billm-progress"


@pytest.mark.parametrize("faults", [  # the default run kills mid-block; the other moments are slow
    pytest.param(["before-block:1"], marks=pytest.mark.slow), ["mid-block:2"],
    pytest.param(["mid-hidden:1"], marks=pytest.mark.slow), pytest.param(["after-hidden:3"], marks=pytest.mark.slow),
    pytest.param(["after-block:0", "mid-hidden:2"], marks=pytest.mark.slow),  # killed twice, resumed twice
])
def test_sigkill_then_resume_gives_byte_identical_files(tiny4, baseline, tmp_path, faults):
    out = tmp_path / "q"
    for fault in faults:
        r = _run(_argv(tiny4, out), fault)
        assert r.returncode == -signal.SIGKILL, r.stderr
        assert not out.exists()  # nothing under the final name until it is complete
        assert _progress(out).is_dir()
    r = _run(_argv(tiny4, out))
    assert r.returncode == 0, r.stderr
    assert _files(out) == baseline
    assert not _progress(out).exists()  # progress is removed once the checkpoint is safe


REC = ("--reconstruct", "4", "--reconstruct-lr", "0.05", "--reconstruct-batch", "2", "--reconstruct-target", "fpinputs")


@pytest.mark.slow
@pytest.mark.parametrize("faults", [["before-block:2"], ["mid-hidden:1", "after-hidden:2"]])
def test_reconstruction_with_a_second_stream_resumes_to_the_same_bytes(tiny4, tmp_path, faults):
    # the full-precision stream is saved beside the activations: a resumed run tunes the next block toward the
    # same targets, and the same command gives the same bytes
    base = tmp_path / "base"
    assert _run(_argv(tiny4, base, *REC)).returncode == 0
    again = tmp_path / "again"
    assert _run(_argv(tiny4, again, *REC)).returncode == 0
    assert _files(again) == _files(base)
    assert json.loads((base / "billm_quant.json").read_text())["config"]["reconstruct"] == 4
    out = tmp_path / "q"
    for fault in faults:
        assert _run(_argv(tiny4, out, *REC), fault).returncode == -signal.SIGKILL
    r = _run(_argv(tiny4, out, *REC))
    assert r.returncode == 0, r.stderr
    assert _files(out) == _files(base)


@pytest.mark.slow
def test_activations_saved_every_n_blocks_resume_to_the_same_bytes(tiny4, baseline, tmp_path):
    out = tmp_path / "q"
    r = _run(_argv(tiny4, out, "--checkpoint-every", "2"), fault="before-block:3")
    assert r.returncode == -signal.SIGKILL
    from safetensors import safe_open

    with safe_open(str(_progress(out) / "hidden.safetensors"), "pt") as f:
        assert f.metadata()["after_block"] == "1"  # saved after blocks 1, 3, ...: block 2 is redone
    assert (_progress(out) / "block-0002.safetensors").is_file()
    r = _run(_argv(tiny4, out, "--checkpoint-every", "2"))
    assert r.returncode == 0, r.stderr
    assert _files(out) == baseline


@pytest.mark.slow
def test_kill_at_random_moments(tiny4, baseline, tmp_path):
    rng = random.Random(1234)
    out = tmp_path / "q"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    for _ in range(2):
        p = subprocess.Popen([sys.executable, "-m", "billm", *_argv(tiny4, out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and not _progress(out).exists() and p.poll() is None:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere inside the block loop (or after it)
        p.send_signal(signal.SIGKILL)
        p.wait()
    r = _run(_argv(tiny4, out))
    assert r.returncode == 0, r.stderr
    assert _files(out) == baseline


@pytest.mark.slow
def test_restart_ignores_progress_and_other_runs_progress_is_refused(tiny4, baseline, tmp_path):
    out = tmp_path / "q"
    assert _run(_argv(tiny4, out), "after-hidden:1").returncode == -signal.SIGKILL
    r = _run(_argv(tiny4, out, "--seed", "7"))  # a different run must not pick up this progress
    assert r.returncode == 2 and "progress of a different run" in r.stderr and "--restart" in r.stderr
    r = _run(_argv(tiny4, out, "--restart"))
    assert r.returncode == 0, r.stderr
    assert _files(out) == baseline


def test_same_seed_same_bytes_and_the_map_records_seed_and_versions(tiny4, baseline, tmp_path):
    out = tmp_path / "again"
    assert _run(_argv(tiny4, out)).returncode == 0
    assert _files(out) == baseline
    qmap = json.loads((out / "billm_quant.json").read_text())
    assert qmap["calibration"] == {"source": "pydoc", "nsamples": 3, "seqlen": 32, "seed": 0}
    assert qmap["billm_version"] == billm.__version__ and qmap["torch_version"] == torch.__version__
    assert qmap["transformers_version"] and qmap["source_model"] == str(tiny4)


# ----------------------------------------------------------------------------- early, clear errors (in process)

def test_not_enough_disk_space_fails_before_quantizing(tiny4, tmp_path, monkeypatch, capsys):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    rc = main(_argv(tiny4, tmp_path / "q"))
    err = capsys.readouterr().err
    assert rc == 2 and "not enough disk space" in err and "GB needed" in err
    assert not (tmp_path / "q").exists() and not _progress(tmp_path / "q").exists()


def test_output_holding_another_models_checkpoint_is_refused(tiny4, make_tiny_folder, tmp_path, capsys):
    other = make_tiny_folder(tmp_path / "other", layers=2, seed=1)
    out = tmp_path / "q"
    assert main(_argv(other, out)) == 0
    before = (out / "model.safetensors").read_bytes()
    rc = main(_argv(tiny4, out))
    assert rc == 2 and "different model" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(_argv(tiny4, out, "--force")) == 0
    assert json.loads((out / "billm_quant.json").read_text())["source_model"] == str(tiny4)


def test_non_finite_activations_name_the_layer(tiny_config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[3] = float("inf")
    with pytest.raises(billm.QuantizationError, match=r"NaN/Inf.*model\.layers\.0\.mlp\.gate_proj"):
        billm.quantize(model, torch.randint(0, 120, (2, 16)), billm.BiLLMConfig(blocksize=32), progress=False)
