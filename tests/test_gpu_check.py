"""benchmarks/gpu_check.sh: its CPU smoke (every step at toy size) and its pure parts.

The GPU check itself needs a CUDA GPU (docs/gpu.md); here it runs with ``--cpu-smoke``: a tiny random
model, the `cuda` tests collected and skipped, two evaluation windows, the lookup path timed.
"""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from billm.kernels import LUT_MAX_TOKENS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_check():
    """The helper module ``benchmarks/gpu_check.py`` (benchmarks are not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_check", None)


def _smoke(out: Path, steps: str) -> dict:
    r = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(out), "--steps", steps], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_but_the_benchmark(tmp_path):
    res = _smoke(tmp_path, "tests,quantize,eval,crossover")
    assert res["ok"] and res["environment"]["device"] == "cpu" and res["environment"]["gpu"] is None
    steps = res["steps"]
    (tests,) = steps["tests"]["runs"].values()
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"]  # the cuda tests, skipped on a CPU
    q = steps["quantize"]["main"]
    assert q["layers"] == 14 and 1 < q["weight_bits"] < 2 and "--refine-rounds" in q["cmd"]
    (ev,) = steps["eval"]["runs"].values()
    assert math.isfinite(ev["ppl"]) and "--dtype bfloat16" in ev["cmd"]
    c = steps["crossover"]["formats"]["billm"]
    assert set(c["lut"]) == set(c["dequant"]) == {"1", "4"}  # JSON keys
    assert steps["crossover"]["current_max_tokens"] == LUT_MAX_TOKENS  # the CPU's lut/dense crossover


@pytest.mark.slow
def test_cpu_smoke_with_the_kernel_benchmark(tmp_path):
    res = _smoke(tmp_path, "bench")
    assert res["ok"] and {r["path"] for r in res["steps"]["bench"]["results"]} >= {"dequant", "auto"}


def test_crossover_is_the_last_count_the_fast_path_wins(gpu_check):
    dequant = {1: 1.0, 4: 5.0, 16: 40.0, 64: 100.0}
    assert gpu_check.crossover_tokens({1: 9.0, 4: 8.0, 16: 30.0, 64: 200.0}, dequant) == 4  # not 64: the first loss ends it
    assert gpu_check.crossover_tokens({1: 0.5, 4: 9.0, 16: 50.0, 64: 200.0}, dequant) is None


def test_junit_counts_sum_the_suites(gpu_check, tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1"/>'
                   '<testsuite tests="2" failures="0" errors="1" skipped="0"/></testsuites>')
    assert gpu_check.junit_counts(xml) == {"tests": 5, "failures": 1, "errors": 1, "skipped": 1}


def test_the_gpu_plan_fits_eight_minutes_and_covers_both_half_dtypes(gpu_check, tmp_path):
    plan = gpu_check.gpu_plan(None)
    assert plan.budget <= 8 * 60
    assert ["-m", "cuda", "tests"] in plan.tests
    assert {d for d, _ in plan.evals} >= {"float16", "bfloat16"} and plan.eval_windows == 8
    assert plan.shapes == "llama7b" and "--device" in plan.bench_args and plan.fast_path == "triton"
    assert (plan.calib, plan.task) == ("pydoc", "pydoc")  # no data folder: sources that ship with Python
    (tmp_path / "c4").mkdir()
    (tmp_path / "wikitext-2-raw").mkdir()
    assert (gpu_check.gpu_plan(tmp_path).calib, gpu_check.gpu_plan(tmp_path).task) == ("c4", "wikitext2")
