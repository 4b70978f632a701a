"""The packed checkpoint of SmolLM2-135M: size on disk, storage bits, peak memory and speed of evaluation.

    python benchmarks/bench_packed.py [--nsamples 32 --seqlen 512] [--eval-windows 4] [--keep DIR]

Quantizes SmolLM2-135M with BiLLM (default config, C4 calibration from ``--data-dir``) and saves
two checkpoints: non-quantized tensors in float32 (the model's dtype as loaded, the exact round
trip) and in float16 (``--save-dtype float16``). Then runs ``billm eval`` (WikiText-2, GPTQ
protocol, first ``--eval-windows`` windows of ``--eval-seqlen`` tokens) in a fresh process for
each of: the full-precision model in float32 and in float16, and both checkpoints, recording
each process's peak resident memory (``getrusage`` of the child) and tokens per second. Sizes
are compared with the same model in fp16 (2 bytes a parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import billm
from billm.data import get_calibration_batches
from billm.model.loading import load_model

_CHILD = """
import resource, subprocess, sys, json
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
if r.returncode:
    sys.stderr.write(r.stderr); sys.exit(r.returncode)
print(json.dumps({"max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def measure_eval(model: str, dtype: str, seqlen: int, args, workdir: Path) -> dict:
    """Run ``billm eval`` in a fresh process; its perplexity, tokens/s and peak RSS."""
    out = workdir / f"eval-{abs(hash((model, dtype, seqlen)))}.json"
    cmd = [sys.executable, "-m", "billm", "eval", model, "--tasks", "wikitext2", "--seqlen", str(seqlen),
           "--max-windows", str(args.eval_windows), "--dtype", dtype, "--json", str(out), "--data-dir", args.data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD] + cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    rss_kb = json.loads(r.stdout.strip().splitlines()[-1])["max_rss_kb"]
    res = json.loads(out.read_text())["perplexity"]["wikitext2"]
    return {"ppl": res["ppl"], "tokens_per_s": res["n_tokens"] / res["seconds"], "eval_seconds": res["seconds"],
            "process_seconds": wall, "peak_rss_mb": rss_kb / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--short-seqlen", type=int, default=128,
                    help="a second, short evaluation where the weights, not the activations, dominate memory")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--keep", default=None, help="keep the float32 checkpoint in this folder")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads")

    work = Path(tempfile.mkdtemp(prefix="bench-packed-"))
    try:
        model, tok = load_model(None)
        calib = get_calibration_batches("c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                        data_dir=args.data_dir)
        t0 = time.perf_counter()
        report = billm.quantize(model, calib, billm.BiLLMConfig())
        print(f"quantized in {time.perf_counter() - t0:.0f}s ({args.nsamples}x{args.seqlen} C4 tokens)")
        ck = {"float32": work / "ck-fp32", "float16": work / "ck-fp16"}
        for dt, path in ck.items():
            t0 = time.perf_counter()
            billm.save(model, path, tok, report=report, dtype=getattr(torch, dt))
            print(f"saved {dt} checkpoint in {time.perf_counter() - t0:.1f}s")
        ids = torch.randint(0, 1000, (1, 256))
        with torch.no_grad():
            diff = float((billm.load(ck["float32"])(ids).logits - model(ids).logits).abs().max())
        del model

        infos = {dt: billm.inspect_checkpoint(p) for dt, p in ck.items()}
        i32 = infos["float32"]
        print("\n## Size")
        print(f"quantized linears: {i32.n_quantized:,} weights, {i32.weight_bits:.3f} weight bits, "
              f"{i32.storage_bits:.3f} storage bits measured from the file (the run's report: {report.storage_bits:.3f})")
        packed = sum(l.nbytes for l in i32.layers)
        print("packed bytes: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in
                                           sorted(i32.bytes_by_kind().items(), key=lambda kv: -kv[1])))
        print(f"fp16 model: {i32.fp16_bytes / 1e6:.1f} MB ({i32.n_params:,} parameters)")
        for dt, info in infos.items():
            print(f"checkpoint, other tensors in {dt}: {info.file_bytes / 1e6:.1f} MB = packed {packed / 1e6:.1f} MB + "
                  f"other {info.other_bytes / 1e6:.1f} MB; {info.fp16_bytes / info.file_bytes:.2f}x smaller than fp16")
        print(f"round trip: max |logits(loaded) - logits(in-memory quantized)| = {diff:.2e}")

        runs = {
            "full precision, float32": ("smollm2", "float32"),
            "full precision, float16": ("smollm2", "float16"),
            "packed BiLLM, float32 rest": (str(ck["float32"]), "auto"),
            "packed BiLLM, float16 rest": (str(ck["float16"]), "auto"),
        }
        results: dict[int, dict] = {}
        for seqlen in (args.eval_seqlen, args.short_seqlen):
            print(f"\n## billm eval (WikiText-2, {args.eval_windows} windows of {seqlen}, fresh process each)")
            res = results[seqlen] = {}
            for label, (m, dt) in runs.items():
                r = res[label] = measure_eval(m, dt, seqlen, args, work)
                print(f"{label:28s} ppl {r['ppl']:10.2f}  {r['tokens_per_s']:7.0f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB")
            base = res["full precision, float32"]
            for label, r in res.items():
                print(f"{label:28s} speed {r['tokens_per_s'] / base['tokens_per_s']:.2f}x, "
                      f"peak RSS {r['peak_rss_mb'] / base['peak_rss_mb']:.2f}x of full precision float32")
        if args.json:
            Path(args.json).write_text(json.dumps({
                "command": " ".join(sys.argv), "threads": args.threads, "round_trip_max_abs_diff": diff,
                "weight_bits": i32.weight_bits, "storage_bits": i32.storage_bits, "packed_bytes": packed,
                "bytes_by_kind": i32.bytes_by_kind(), "fp16_bytes": i32.fp16_bytes,
                "checkpoint_bytes": {dt: info.file_bytes for dt, info in infos.items()}, "eval": results}, indent=2))
        if args.keep:
            shutil.copytree(ck["float32"], args.keep, dirs_exist_ok=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
