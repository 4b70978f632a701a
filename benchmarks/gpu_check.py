"""One GPU check of billm, written as one JSON file (run it through ``benchmarks/gpu_check.sh``).

    bash benchmarks/gpu_check.sh [OUT.json]            # one CUDA GPU, about 6 minutes (limits keep it under 8)
    bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR    # every step at toy size on the CPU (the test suite runs it)

Steps, each recorded with its seconds and whether it passed (a failed step does not stop the others):

* ``tests``: the tests marked ``cuda`` and the Triton kernel tests, compiled (no ``TRITON_INTERPRET``);
* ``quantize``: SmolLM2-135M with BiLLM on CUDA (C4 calibration, 32 x 512 tokens, as
  the tables under ``docs/results``), and a short second run with ``--refine-rounds 2``;
* ``eval``: WikiText-2 perplexity, 8 windows of 2048 tokens, of the checkpoint in float32, float16 and
  bfloat16 through ``auto``, and in float16 and bfloat16 forced through the Triton kernels;
* ``tune``: the Triton kernels' row block, warps and split-K target timed at 1 and 16 tokens through one
  LLaMA-7B block's linears (the measurement behind ``billm.kernels.tiles``), and the dense path's
  Triton decoder beside an fp16 copy of the same weights;
* ``crossover``: tokens/s of the Triton kernels, decode-then-cuBLAS (``dense``: byte-table decode;
  ``dequant``: the format's decoder) and dense fp16 at 1 to 128 tokens through one LLaMA-7B block's
  linears, the measurement behind ``billm.kernels.TRITON_MAX_TOKENS`` (``crossover_tokens``: the
  largest count at which the kernels are at least as fast as ``dense``; the sweep's largest may mean more);
* ``bench``: ``benchmarks/bench_kernels.py`` at LLaMA-7B block shapes against cuBLAS fp16, 1, 128 and
  2048 tokens, with the memory each path holds (goals: decode >= 2.5x fp16, prompts >= 0.8x);
* ``compile``: ``billm generate --compile`` (static KV cache) against eager, tokens/s of each.

The JSON is written again after every step, so a run cut short keeps the steps it finished.

Each command has a time limit and the whole check a budget (480 s on the GPU), so it ends within
8 minutes even when something hangs.

The JSON names the GPU (``torch.cuda.get_device_name``), the versions and the commit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "docs" / "results" / "gpu" / "gpu_check.json"


@dataclass
class Plan:
    """What one check runs: the full GPU check or its CPU smoke.

    Attributes:
        device: where everything runs.
        model: a model name or folder for ``billm quantize``.
        calib, task: calibration source and perplexity set (``pydoc`` when the data folder lacks C4 / WikiText-2).
        quantize_args: options of the main quantization; ``refine_args`` of a second, short one (None: none).
        eval_seqlen, eval_windows: the perplexity windows.
        evals: (dtype, kernel) pairs evaluated.
        tests: pytest argument lists (each one run).
        bench_args: arguments of ``bench_kernels.py``.
        shapes, formats, tokens: the crossover sweep.
        fast_path: the kernel path the sweep times against ``dequant``.
        limits: seconds allowed per command of each step kind.
        budget: seconds for the whole check; a command gets at most what is left, a step with
            nothing left is recorded as not run.
    """

    device: str
    model: str
    data_dir: Optional[str]
    calib: str
    task: str
    quantize_args: list[str]
    refine_args: Optional[list[str]]
    eval_seqlen: int
    eval_windows: int
    evals: list[tuple[str, str]]
    tests: list[list[str]]
    bench_args: list[str]
    shapes: str
    formats: list[str]
    tokens: list[int]
    fast_path: str
    repeat: int
    tune_tokens: list[int] = field(default_factory=lambda: [1, 16])
    compile_backend: str = "inductor"
    limits: dict[str, int] = field(default_factory=dict)
    budget: int = 480


class Clock:
    """Seconds left of a check's budget."""

    def __init__(self, budget: float) -> None:
        self.end = time.perf_counter() + budget

    def left(self) -> float:
        return self.end - time.perf_counter()

    def limit(self, seconds: float) -> int:
        """``seconds``, or what is left of the budget if less (at least 1)."""
        return max(1, int(min(seconds, self.left())))


def find_data_dir() -> Optional[Path]:
    """``$BILLM_DATA_DIR``, else the shared data folder beside the checkout, else None."""
    for cand in (os.environ.get("BILLM_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


def _sources(data_dir: Optional[Path]) -> tuple[str, str]:
    """(calibration source, perplexity set): C4 and WikiText-2 where the data folder has them, else pydoc."""
    has = lambda sub: data_dir is not None and (data_dir / sub).is_dir()  # noqa: E731
    return ("c4" if has("c4") else "pydoc"), ("wikitext2" if has("wikitext-2-raw") else "pydoc")


def gpu_plan(data_dir: Optional[Path]) -> Plan:
    """The check on one CUDA GPU."""
    calib, task = _sources(data_dir)
    return Plan(
        device="cuda", model="smollm2", data_dir=str(data_dir) if data_dir else None, calib=calib, task=task,
        quantize_args=["--nsamples", "32", "--seqlen", "512"],
        refine_args=None,
        eval_seqlen=2048, eval_windows=8,
        evals=[("float32", "auto"), ("float16", "auto"), ("bfloat16", "auto"), ("float16", "triton"),
               ("bfloat16", "triton")],
        tests=[["-m", "cuda", "tests"], ["tests/test_kernels.py", "-k", "triton"]],
        bench_args=["--device", "cuda", "--shapes", "llama7b", "--formats", "billm,gptq2,slim2", "--repeat", "5",
                    "--prompt", "128,2048", "--sweep-shapes", "none"],
        shapes="llama7b", formats=["billm", "gptq2", "slim2"], tokens=[1, 2, 4, 8, 16, 32, 64, 128],
        fast_path="triton", repeat=5,
        limits={"tests": 150, "quantize": 90, "refine": 60, "eval": 45, "tune": 100, "bench": 120, "compile": 80},
        budget=480,
    )


def smoke_plan(model_dir: Path, data_dir: Optional[Path]) -> Plan:
    """Every step at toy size on the CPU: a tiny random model, two windows, one format."""
    _, task = _sources(data_dir)
    return Plan(
        device="cpu", model=str(model_dir), data_dir=str(data_dir) if data_dir else None, calib="pydoc", task=task,
        quantize_args=["--nsamples", "4", "--seqlen", "32", "--refine-rounds", "2"],  # one run covers both
        refine_args=None,
        eval_seqlen=64, eval_windows=2,
        evals=[("bfloat16", "lut")],
        tests=[["-m", "cuda", "tests/test_device.py"]],  # collected and skipped on a CPU: the plumbing only
        bench_args=["--device", "cpu", "--shapes", "smollm2", "--formats", "billm", "--repeat", "1", "--prompt", "4",
                    "--sweep-shapes", "none"],
        shapes="smollm2", formats=["billm"], tokens=[1, 4], fast_path="lut", repeat=1, compile_backend="aot_eager",
        limits={"tests": 60, "quantize": 60, "refine": 60, "eval": 60, "bench": 60, "compile": 60}, budget=300,
    )


def tiny_model(folder: Path) -> Path:
    """A 2-block random LLaMA with a byte-level tokenizer, saved as a Hugging Face folder (the smoke's model)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(alphabet), max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=256).save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------- steps


def _run(cmd: list[str], limit: int, env: Optional[dict] = None, keep: bool = False) -> dict[str, Any]:
    """Run ``cmd`` from the repository root; its return code, seconds and output tail (when it failed, or ``keep``)."""
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=limit, env=env)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", f"{e.stdout or ''}{e.stderr or ''}"
        out = out.decode() if isinstance(out, bytes) else out
    return {"cmd": " ".join(cmd), "rc": rc, "ok": rc == 0, "seconds": round(time.perf_counter() - t0, 1),
            "tail": out[-1500:] if rc != 0 or keep else ""}


def _billm(*args: str) -> list[str]:
    return [sys.executable, "-m", "billm", *args]


def junit_counts(path: Path) -> dict[str, int]:
    """Tests, failures, errors and skips summed over a JUnit XML file's suites."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    return {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}


def step_tests(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """Each pytest selection of the plan, with its counts."""
    out = {}
    for i, args in enumerate(plan.tests):
        xml = work / f"tests-{i}.xml"
        r = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}", *args],
                 clock.limit(plan.limits["tests"]))
        if xml.exists():
            r.update(junit_counts(xml))
        out[" ".join(args)] = r
    return {"ok": all(r["ok"] for r in out.values()), "runs": out}


def _quantize(plan: Plan, out: Path, extra: list[str], limit: int) -> dict[str, Any]:
    data = ["--data-dir", plan.data_dir] if plan.data_dir else []
    r = _run(_billm("quantize", plan.model, "--out", str(out), "--device", plan.device, "--calib", plan.calib,
                    *extra, *data, "--quiet", "--restart", "--force"), limit)
    report = out / "billm_report.json"
    if r["ok"] and report.exists():
        q = json.loads(report.read_text())["quantization"]
        r.update(weight_bits=q.get("weight_bits"), storage_bits=q.get("storage_bits"), layers=len(q.get("layers", [])))
    return r


def step_quantize(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """The main quantization (its checkpoint is evaluated) and a short one with ``--refine-rounds``."""
    out = {"calib": plan.calib, "main": _quantize(plan, work / "checkpoint", plan.quantize_args,
                                                  clock.limit(plan.limits["quantize"]))}
    if plan.refine_args is not None:
        out["refine"] = _quantize(plan, work / "checkpoint-refine", plan.refine_args, clock.limit(plan.limits["refine"]))
    out["ok"] = all(r["ok"] for k, r in out.items() if k in ("main", "refine"))
    return out


def step_eval(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """Perplexity of the checkpoint for each (dtype, kernel) of the plan."""
    ck = work / "checkpoint"
    data = ["--data-dir", plan.data_dir] if plan.data_dir else []
    runs = {}
    for dtype, kernel in plan.evals:
        j = work / f"eval-{dtype}-{kernel}.json"
        r = _run(_billm("eval", str(ck), "--tasks", plan.task, "--seqlen", str(plan.eval_seqlen), "--max-windows",
                        str(plan.eval_windows), "--device", plan.device, "--dtype", dtype, "--kernel", kernel,
                        "--json", str(j), *data), clock.limit(plan.limits["eval"]))
        if r["ok"] and j.exists():
            r["ppl"] = json.loads(j.read_text())["perplexity"][plan.task]["ppl"]
        runs[f"{dtype}/{kernel}"] = r
    ppls = [r.get("ppl") for r in runs.values()]
    finite = all(p is not None and p == p and p != float("inf") for p in ppls)
    return {"ok": all(r["ok"] for r in runs.values()) and finite, "task": plan.task, "seqlen": plan.eval_seqlen,
            "windows": plan.eval_windows, "runs": runs}


def step_bench(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """``benchmarks/bench_kernels.py`` (each format and path in a fresh process), its JSON kept."""
    j = work / "bench_kernels.json"
    r = _run([sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), *plan.bench_args, "--json", str(j)],
             clock.limit(plan.limits["bench"]))
    if r["ok"] and j.exists():
        r["results"] = json.loads(j.read_text())["results"]
    return r


def crossover_tokens(fast: dict[int, float], dequant: dict[int, float]) -> Optional[int]:
    """The largest token count up to which the fast path is at least as fast as decode-then-matmul (None: never)."""
    best = None
    for t in sorted(fast):
        if fast[t] < dequant[t]:
            break
        best = t
    return best


def step_crossover(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """Tokens/s through one decoder block's linears, fast path against decode-then-matmul and dense, per token count.

    Formats left when the budget runs out are not measured (listed under ``not_measured``).
    """
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_kernels as bk
    from billm.kernels import LUT_MAX_TOKENS, TRITON_MAX_TOKENS
    from billm.packing.linear import PackedLinear

    dev = torch.device(plan.device)
    cuda = dev.type == "cuda"
    measure = bk.timer(dev, plan.repeat)
    dtype = torch.float16 if cuda else torch.float32
    shapes = bk.SHAPES[plan.shapes]
    g = torch.Generator().manual_seed(0)
    dense = [torch.randn(r, c, generator=g).to(device=dev, dtype=dtype) for r, c in shapes]

    def through(layers) -> dict[int, float]:
        speeds = {}
        for T in plan.tokens:
            xs = {c: torch.randn(T, c, device=dev, dtype=dtype) for _, c in shapes}

            def fn():
                with torch.no_grad():
                    for layer, (_, c) in zip(layers, shapes):
                        layer(xs[c])
            speeds[T] = round(T / measure(fn), 1)  # bench_kernels' timer: CUDA-graph replays on a GPU
        return speeds

    out: dict[str, Any] = {"shapes": plan.shapes, "dtype": str(dtype), "fast_path": plan.fast_path,
                           "current_max_tokens": TRITON_MAX_TOKENS if cuda else LUT_MAX_TOKENS,
                           "dense": through([lambda x, w=w: F.linear(x, w) for w in dense]), "formats": {}}
    out["not_measured"] = []
    for fmt in plan.formats:
        if clock.left() < 20:
            out["not_measured"].append(fmt)
            continue
        mods = [PackedLinear.from_stored(bk.random_stored(fmt, r, c, g).to(dev)) for r, c in shapes]
        per = {}
        for path in (plan.fast_path, "dense") + (() if cuda else ("dequant",)):  # the reference decoder: CPU only
            for m in mods:
                m.kernel = path
            per[path] = through(mods)
        per["crossover_tokens"] = crossover_tokens(per[plan.fast_path], per["dense"])
        out["formats"][fmt] = per
    # the setting the measurement supports: the smallest crossover over the formats (0: some format never wins)
    found = [p["crossover_tokens"] or 0 for p in out["formats"].values()]
    out["measured_max_tokens"] = min(found, default=None)
    out["ok"] = True
    return out


# (row block, column block, warps, split-K waves) timed by the tune step: one token (GEMV), 16 tokens (tl.dot)
TUNE_GEMV = [(br, bk, w, 16) for br in (64, 128, 256) for bk in (32, 64) for w in (4, 8)]
TUNE_DOT = [(64, 32, 4, 16), (128, 32, 4, 16), (64, 64, 4, 16)]
TUNE_DECODE = [(64, 32), (128, 32)]  # (rows, columns) of triton_decode's steps


def step_tune(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """The Triton kernels' tile choices timed through one decoder block's linears, beside fp16 dense.

    For each format and token count of ``plan.tune_tokens``: tokens/s at each row block, column block, warps per
    program and split-K target (:data:`billm.kernels.tiles.WAVES`) of :data:`TUNE_GEMV` / :data:`TUNE_DOT`, timed
    from CUDA-graph replays; ``best`` is the fastest. Also the milliseconds of
    :func:`billm.kernels.triton_kernels.triton_decode` over the block's weights (the ``dense`` path's decoder) at
    each of :data:`TUNE_DECODE`, beside a copy of the same weights in fp16 (the memory-bound floor of writing them).
    Formats left when the budget runs out are listed under ``not_measured``.
    """
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_kernels as bk
    from billm.kernels import tiles
    from billm.kernels import triton_kernels as tk

    dev = torch.device(plan.device)
    if dev.type != "cuda":  # compiled Triton tiles only: the CPU smoke has nothing to tune
        return {"ok": True, "skipped": "the tile choices are timed on CUDA only"}
    dtype = torch.float16
    shapes = bk.SHAPES[plan.shapes]
    g = torch.Generator().manual_seed(0)
    measure = bk.timer(dev, plan.repeat)
    xs = {T: {c: torch.randn(T, c, device=dev, dtype=dtype) for _, c in shapes} for T in plan.tune_tokens}
    dense = [torch.randn(r, c, generator=g).to(device=dev, dtype=dtype) for r, c in shapes]

    def dense_fn(T):
        return lambda: [F.linear(xs[T][c], w) for w, (_, c) in zip(dense, shapes)]

    out: dict[str, Any] = {"shapes": plan.shapes, "dtype": str(dtype), "timing": "cuda graph replays" if dev.type ==
                           "cuda" else "wall clock", "default_waves": tiles.WAVES,
                           "fp16_tok_s": {T: round(T / measure(dense_fn(T)), 1) for T in plan.tune_tokens},
                           "fp16_copy_ms": round(measure(lambda: [w.clone() for w in dense]) * 1e3, 4),
                           "formats": {}, "not_measured": []}
    saved, saved_decode = tiles.WAVES, tk.DECODE_TILES
    stop = time.perf_counter() + plan.limits.get("tune", 120)
    try:
        for fmt in plan.formats:
            if clock.left() < 30 or time.perf_counter() > stop:
                out["not_measured"].append(fmt)
                continue
            layouts = [bk.random_stored(fmt, r, c, g).to(dev).layout() for r, c in shapes]
            rows = []
            for T in plan.tune_tokens:
                bt = tiles.block_sizes(T, shapes[0][0])[0]
                grid = TUNE_GEMV if bt == 1 else TUNE_DOT
                for br, bk_, warps, waves in grid:
                    if clock.left() < 20 or time.perf_counter() > stop:
                        break
                    tiles.WAVES = waves
                    fn = lambda T=T, br=br, bk_=bk_, warps=warps: [  # noqa: E731
                        tk.triton_matmul(xs[T][c], lay, blocks=(bt, br, bk_), warps=warps)
                        for lay, (_, c) in zip(layouts, shapes)]
                    row = {"tokens": T, "block_r": br, "block_k": bk_, "warps": warps, "waves": waves}
                    try:
                        row["tok_s"] = round(T / measure(fn), 1)
                        row["vs_fp16"] = round(row["tok_s"] / out["fp16_tok_s"][T], 3)
                    except Exception as e:  # noqa: BLE001  (a config that does not launch is recorded)
                        row["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    rows.append(row)
            tiles.WAVES = saved
            ok = [r for r in rows if "tok_s" in r]
            best = {T: max((r for r in ok if r["tokens"] == T), key=lambda r: r["tok_s"], default=None)
                    for T in plan.tune_tokens}
            decode = {}
            for dt in TUNE_DECODE:
                if time.perf_counter() > stop:
                    break
                tk.DECODE_TILES = dt
                decode["x".join(map(str, dt))] = round(measure(
                    lambda: [tk.triton_decode(lay, c, dtype) for lay, (_, c) in zip(layouts, shapes)]) * 1e3, 4)
            tk.DECODE_TILES = saved_decode
            decode_ms = min(decode.values(), default=float("nan"))
            out["formats"][fmt] = {"configs": rows, "best": best, "triton_decode_ms": decode_ms,
                                   "triton_decode_ms_by_tiles": decode}
    finally:
        tiles.WAVES = saved
        tk.DECODE_TILES = saved_decode
    out["ok"] = bool(out["formats"])
    return out


def step_compile(plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """``billm generate`` of the checkpoint, eager and with ``--compile`` (static KV cache): tokens/s of each
    (the compiled run's figure includes its compilation)."""
    import re

    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile", plan.compile_backend])):
        r = _run(_billm("generate", str(work / "checkpoint"), "def f(", "--max-new-tokens", "32", "--device", plan.device,
                        *extra), clock.limit(plan.limits["compile"]), keep=True)
        m = re.search(r"\[(\d+) tokens in ([0-9.]+)s, ([0-9.]+) tokens/s\]", r["tail"])
        runs[name] = {**r, "tokens_per_s": float(m.group(3)) if m else None}
    return {"ok": all(r["ok"] for r in runs.values()), "backend": plan.compile_backend, "runs": runs}


Step = Callable[[Plan, Path, Clock], dict[str, Any]]
STEPS: dict[str, Step] = {  # in this order: correctness first, then the kernels' choices and speed
    "tests": step_tests, "quantize": step_quantize, "eval": step_eval, "tune": step_tune, "bench": step_bench,
    "crossover": step_crossover, "compile": step_compile,
}


def _guarded(fn: Step, plan: Plan, work: Path, clock: Clock) -> dict[str, Any]:
    """A step's result, or its error: one failed step leaves the others to run."""
    t0 = time.perf_counter()
    if clock.left() < 5:
        return {"ok": False, "error": "not run: the check's time budget is spent", "step_seconds": 0.0}
    try:
        r = fn(plan, work, clock)
    except Exception as e:  # noqa: BLE001  (recorded in the JSON, the check goes on)
        r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    r["step_seconds"] = round(time.perf_counter() - t0, 1)
    return r


def environment(device: str) -> dict[str, Any]:
    """GPU name, versions and commit of this check."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    digest = hashlib.sha256()  # what ran, whatever the copy's git says (a copied tree may carry an older HEAD)
    for f in sorted([*(REPO / "src").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]):
        digest.update(f.relative_to(REPO).as_posix().encode() + b"\0" + f.read_bytes())
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return {"gpu": torch.cuda.get_device_name(0) if cuda else None, "device": device, "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": commit.strip(), "source_sha256": digest.hexdigest()[:16], "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "triton_interpret": os.environ.get("TRITON_INTERPRET")}


def run_check(plan: Plan, work: Path, out: Path, steps: Optional[list[str]] = None) -> dict[str, Any]:
    """Run the plan's steps in ``work`` and write the JSON to ``out``; returns it."""
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    clock = Clock(plan.budget)
    result: dict[str, Any] = {"environment": environment(plan.device), "plan": asdict(plan), "steps": {}}
    out.parent.mkdir(parents=True, exist_ok=True)
    for name in steps or list(STEPS):
        print(f"gpu_check: {name} ...", flush=True)
        result["steps"][name] = _guarded(STEPS[name], plan, work, clock)
        print(f"gpu_check: {name} {'ok' if result['steps'][name]['ok'] else 'FAILED'} "
              f"({result['steps'][name]['step_seconds']} s)", flush=True)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["ok"] = all(s["ok"] for s in result["steps"].values())
        out.write_text(json.dumps(result, indent=1))  # after every step: a run cut short keeps what it finished
    print(f"gpu_check: written {out} ({'all passed' if result['ok'] else 'some steps FAILED'}, {result['seconds']} s)")
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", help=f"JSON file (default {DEFAULT_OUT.relative_to(REPO)}); with --cpu-smoke a folder")
    ap.add_argument("--cpu-smoke", action="store_true", help="every step at toy size on the CPU")
    ap.add_argument("--steps", help=f"comma-separated subset of {','.join(STEPS)}")
    ap.add_argument("--work", help="folder for checkpoints and logs (default: OUTDIR/work with --cpu-smoke, else a "
                                   "temporary folder)")
    args = ap.parse_args(argv)
    steps = args.steps.split(",") if args.steps else None
    data_dir = find_data_dir()
    if args.cpu_smoke:
        if not args.out:
            ap.error("--cpu-smoke needs an output folder")
        folder = Path(args.out)
        work = Path(args.work) if args.work else folder / "work"
        model = tiny_model(work / "tiny-model")
        result = run_check(smoke_plan(model, data_dir), work, folder / "gpu_check.json", steps)
    else:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA GPU here; use --cpu-smoke OUTDIR for the CPU version")
        out = Path(args.out) if args.out else DEFAULT_OUT
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="billm-gpu-check-"))
        result = run_check(gpu_plan(data_dir), work, out, steps)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
