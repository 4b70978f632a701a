"""Speed and memory of the paths that multiply by a packed weight: decoding (1 token) and prompts.

    python benchmarks/bench_kernels.py [--shapes smollm2,llama7b] [--formats billm,gptq2,slim2]
                                       [--prompt 128,2048] [--device cpu|cuda] [--threads 2] [--json FILE]

For each shape set, the seven linears of one decoder block (SmolLM2-135M: 576-wide, MLP 1536;
LLaMA-7B: 4096-wide, MLP 11008) are built as packed layers of each format, with random bits and
scales (speed does not depend on the values). Then ``x W^T`` runs through all seven, for one token
(decoding) and for each ``--prompt`` token count, by each path:

* ``fp32`` / ``fp16``: dense ``F.linear`` on full-precision weights (the baselines);
* ``dequant``: decode the whole weight per call with the format's decoder, then ``F.linear`` (the reference path);
* ``dense``: decode the whole weight per call with byte tables (``billm.kernels.decode``, the same bits), then ``F.linear``;
* ``auto``: what ``PackedLinear`` picks by itself: on CPU byte lookup tables (``lut``) for up to
  ``billm.kernels.LUT_MAX_TOKENS`` tokens and ``dense`` above; on CUDA the Triton kernels for up to
  ``billm.kernels.TRITON_MAX_TOKENS``, ``dense`` above.

A second table (``--sweep-shapes``) times ``lut`` (CPU) or ``triton`` (CUDA) against ``dense`` at several
token counts: the crossover that sets ``LUT_MAX_TOKENS`` / ``TRITON_MAX_TOKENS``.

Tokens per second through the block are the figures, each also as a ratio against the dense baseline,
all measured in the same run. On CUDA each figure is timed from CUDA-graph replays (the kernels
without Python's launch overhead, as a compiled ``generate`` runs them), and the eager decode speed
is kept beside it (``eager_decode_tok_s``). Each
(format, path) runs in a fresh process, so its memory is its own. On CPU, ``resident MB`` is
the process's resident memory growth from building the layers to after the calls. It counts the
packed weights and any layout the path builds. ``peak MB`` is the process's peak growth over the
same start: the transient buffers of a call. On CUDA both come from ``torch.cuda`` memory stats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    # (out_features, in_features) of q, k, v, o, gate, up, down
    "smollm2": [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)],
    "llama7b": [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)],
}
FORMATS = {"billm": "BiLLM (1.1 weight bits)", "gptq2": "GPTQ w2 g128", "slim2": "SliM-LLM w2 g128"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_stored(fmt: str, rows: int, cols: int, g: torch.Generator):
    """A packed weight of ``fmt`` with random bytes and realistic structure (speed does not depend on values).

    The packed planes are drawn as bytes directly, so building a layer never holds more than its
    packed size (the peak-memory figures are the calls', not the set-up's).
    """
    from billm.kernels.bitpack import pack_bits, pack_codes, packed_len
    from billm import StoredWeight
    from billm.methods.slim import mixed_columns

    def rand_bytes(*shape: int) -> torch.Tensor:
        return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g)

    if fmt == "billm":
        bs, k = 128, 10  # ~8 % salient columns, a typical BiLLM choice per block
        nb = -(-cols // bs)
        sal = torch.zeros(cols, dtype=torch.bool)
        for b in range(nb):
            width = min(bs, cols - b * bs)
            sal[b * bs + torch.randperm(width, generator=g)[:min(k, width)]] = True
        n_sal = int(sal.sum())
        meta = {"blocksize": bs, "n_salient": n_sal, "salient_order": 2, "centred": False, "scale_dtype": "float16"}
        tensors = {"signs": rand_bytes(rows, packed_len(cols)), "group": rand_bytes(rows, packed_len(cols - n_sal)),
                   "salient_mask": pack_bits(sal), "signs2": rand_bytes(rows, packed_len(n_sal)),
                   "scales": (torch.rand(nb, 4, rows, generator=g) * 0.02).half()}
        return StoredWeight("billm", (rows, cols), meta, tensors)
    G = -(-cols // 128)
    scales = (torch.rand(rows, G, generator=g) * 0.02).half()
    if fmt == "gptq2":
        meta = {"bits": 2, "groupsize": 128, "g_idx": False, "scale_dtype": "float16"}
        tensors = {"codes": rand_bytes(2, rows, packed_len(cols)), "scales": scales, "zeros": rand_bytes(2, rows, packed_len(G))}
        return StoredWeight("grid", (rows, cols), meta, tensors)
    if fmt == "slim2":
        gb = [2] * G
        for i in range(G // 8):  # an eighth of the groups up, as many down
            gb[2 * i], gb[2 * i + 1] = 3, 1
        meta = {"group_bits": gb, "groupsize": 128, "scale_dtype": "float16"}
        tensors = {"scales": scales, "zeros": pack_codes(torch.zeros(rows, G, dtype=torch.int32), max(gb))}
        for b, cols_b in mixed_columns(gb, cols, 128).items():
            tensors[f"codes{b}"] = rand_bytes(b, rows, packed_len(len(cols_b)))
        return StoredWeight("mixed", (rows, cols), meta, tensors)
    raise SystemExit(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")


def _time(fn, repeat: int, sync) -> float:
    fn()  # warm-up (builds layouts, compiles kernels)
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_graphed(fn, repeat: int, replays: int = 20) -> float:
    """Median seconds of one ``fn()`` replayed from a CUDA graph (``replays`` replays per sample): the kernels'
    time without Python's launch overhead, as a compiled ``generate`` with CUDA graphs runs them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: builds layouts, compiles kernels, outside the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / replays)
    return statistics.median(times)


def timer(device: torch.device, repeat: int):
    """``time(fn) -> seconds``: CUDA-graph replays on CUDA (:func:`_time_graphed`), the median wall time elsewhere."""
    if device.type != "cuda":
        return lambda fn: _time(fn, repeat, lambda: None)

    def measure(fn) -> float:
        try:
            return _time_graphed(fn, repeat)
        except RuntimeError as e:  # a path that synchronises (the reference decoders) cannot be captured
            print(f"bench_kernels: not capturable, timed eagerly: {str(e)[:120]}", file=sys.stderr)
            torch.cuda.synchronize()
            return _time(fn, repeat, torch.cuda.synchronize)
    return measure


def child(args) -> dict:
    """One (shape set, format, path) in this process: tokens/s and memory."""
    import torch.nn.functional as F

    from billm.packing.linear import PackedLinear

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    g = torch.Generator().manual_seed(0)
    shapes = SHAPES[args.shape_set]
    dtype = torch.float16 if (cuda or args.path == "fp16") else torch.float32
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    rss0, mem0 = _rss_mb(), (torch.cuda.memory_allocated() if cuda else 0)
    if args.path in ("fp32", "fp16"):
        wdt = torch.float32 if args.path == "fp32" else torch.float16
        ws = [torch.randn(r, c, generator=g, dtype=wdt).to(dev) for r, c in shapes]
        layers = [lambda x, w=w: F.linear(x, w) for w in ws]
        dtype = ws[0].dtype
    else:
        mods = []
        for r, c in shapes:
            m = PackedLinear.from_stored(random_stored(args.format, r, c, g).to(dev))
            m.kernel = args.path
            mods.append(m)
        layers = mods
    built = _rss_mb()

    def run(T: int):
        xs = {c: torch.randn(T, c, device=dev, dtype=dtype) for _, c in shapes}  # one input per width, made once

        def fn():
            with torch.no_grad():
                for layer, (_, c) in zip(layers, shapes):
                    layer(xs[c])
        return fn

    out = {"shape_set": args.shape_set, "format": args.format, "path": args.path, "device": str(dev),
           "threads": args.threads, "timing": "cuda graph replays" if cuda else "wall clock"}
    measure = timer(dev, args.repeat)
    t1 = measure(run(1))
    out.update(decode_tok_s=1 / t1, decode_ms=t1 * 1e3, prompt_tok_s={})
    if cuda:  # what an eager (uncompiled) model pays: Python's launch overhead included
        out["eager_decode_tok_s"] = 1 / _time(run(1), args.repeat, sync)
    for T in args.prompt:
        out["prompt_tok_s"][T] = T / measure(run(T))
    if args.sweep_tokens:
        out["sweep"] = {T: T / measure(run(T)) for T in args.sweep_tokens}
    if cuda:
        out.update(resident_mb=(torch.cuda.memory_allocated() - mem0) / 2**20,
                   peak_mb=(torch.cuda.max_memory_allocated() - mem0) / 2**20)
    else:
        out.update(resident_mb=_rss_mb() - rss0, peak_mb=_peak_mb() - rss0, built_mb=built - rss0)
    return out


def _tok(x: dict, T: int) -> float:
    """Prompt tokens/s of a result at ``T`` tokens (int keys in a run, str keys once through JSON)."""
    p = x["prompt_tok_s"]
    return p[T] if T in p else p[str(T)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="smollm2,llama7b")
    ap.add_argument("--formats", default="billm,gptq2,slim2")
    ap.add_argument("--prompt", type=lambda v: [int(t) for t in v.split(",") if t], default=[128],
                    help="token counts of the prompt-processing measurements (comma separated)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--sweep", default="1,4,16,64", help="token counts of the fast-path-vs-dense crossover table")
    ap.add_argument("--sweep-shapes", default="smollm2", help="shape sets the crossover table is measured on")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape-set", help=argparse.SUPPRESS)
    ap.add_argument("--format", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--sweep-tokens", type=lambda v: [int(t) for t in v.split(",") if t], default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return 0

    cuda = args.device.startswith("cuda")
    fast = "triton" if cuda else "lut"
    dense = ["fp16"] if cuda else ["fp32", "fp16"]
    base = "fp16" if cuda else "fp32"
    cmd = "python benchmarks/bench_kernels.py " + " ".join(sys.argv[1:])
    prompts = ",".join(map(str, args.prompt))
    print(f"# {cmd}\n# device {args.device}, {args.threads} threads, torch {torch.__version__}, prompts {prompts} tokens\n")
    results = []
    for shape_set in args.shapes.split(","):
        sweep_here = shape_set in args.sweep_shapes.split(",")
        packed = ("dense", "auto") if cuda else ("dequant", "dense", "auto")  # the reference decoder only on the CPU
        plan = [("-", p) for p in dense] + [(f, p) for f in args.formats.split(",") for p in packed]
        if sweep_here:
            plan += [(f, fast) for f in args.formats.split(",")]
        rows = []
        for fmt, path in plan:
            c = [sys.executable, __file__, "--child", "--shape-set", shape_set, "--format", fmt, "--path", path,
                 "--device", args.device, "--threads", str(args.threads), "--repeat", str(args.repeat),
                 "--prompt", prompts]
            if path in (fast, "dense") and sweep_here:
                c += ["--sweep-tokens", args.sweep]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            r = subprocess.run(c, capture_output=True, text=True, env=env)
            if r.returncode:
                raise SystemExit(f"{' '.join(c)} failed:\n{r.stderr}")
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        b = next(x for x in rows if x["path"] == base)
        print(f"## {shape_set}: the 7 linears of one decoder block {SHAPES[shape_set][0]}..{SHAPES[shape_set][-1]}\n")
        print(f"Tokens per second through the block (in brackets: against {base} dense in the same run)\n")
        cols = ["1 token"] + [f"{T} tokens" for T in args.prompt]
        print("| format | path | " + " | ".join(cols) + " | resident MB | peak MB |")
        print("|---|---|" + "---:|" * (len(cols) + 2))
        for x in [x for x in rows if x["path"] != fast]:
            cells = [f"{x['decode_tok_s']:.1f} ({x['decode_tok_s'] / b['decode_tok_s']:.2f}x)"]
            cells += [f"{_tok(x, T):.0f} ({_tok(x, T) / _tok(b, T):.2f}x)" for T in args.prompt]
            name = FORMATS.get(x["format"], "full precision")
            print(f"| {name} | {x['path']} | " + " | ".join(cells) + f" | {x['resident_mb']:.0f} | {x['peak_mb']:.0f} |")
        print()
        sweep = [x for x in rows if "sweep" in x]
        if sweep:
            toks = list(sweep[0]["sweep"])
            ref = {x["format"]: x for x in sweep if x["path"] == "dense"}
            print(f"Crossover on {shape_set}: tokens/s through the block, {fast} against dense (decode-then-matmul)\n")
            print("| format | path | " + " | ".join(f"{t} tokens" for t in toks) + " |")
            print("|---|---|" + "---:|" * len(toks))
            for x in sweep:
                d = ref[x["format"]]["sweep"]
                cells = [f"{x['sweep'][t]:.0f}" + (f" ({x['sweep'][t] / d[t]:.2f}x)" if x["path"] == fast else "") for t in toks]
                print(f"| {FORMATS[x['format']]} | {x['path']} | " + " | ".join(cells) + " |")
            print()
        results.extend(rows)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
