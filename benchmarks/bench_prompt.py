"""Long prompts on the CPU: a packed model's forward against the float32 model's, timed in turns.

    python benchmarks/bench_prompt.py [--tokens 128,2048] [--formats billm,gptq2,slim2] [--paths dense,dequant]
                                      [--threads 2] [--repeat 7] [--checkpoint DIR --windows 2] [--json FILE]

On a shared machine the load changes from second to second, so two figures measured one after
the other (as ``bench_kernels.py``'s fresh processes are) can differ by 2x for no reason of their
own. Here the baseline and each packed path run in the same process, in turns: ``repeat`` rounds
of (float32, packed), and the figure is the median over rounds of ``t_fp32 / t_packed`` (each
round's two calls see about the same load), beside the median times.

* ``block``: the seven linears of one SmolLM2-135M decoder block (``bench_kernels.SHAPES``), packed
  layers of each format with random bits (speed does not depend on the values), against float32
  ``F.linear``, at each ``--tokens`` count;
* ``model`` (with ``--checkpoint``, a billm checkpoint of SmolLM2-135M): WikiText-2 test windows of
  2048 tokens through the whole packed model and through the float32 model it came from
  (``billm.model.load_model("smollm2")``), each with its perplexity, so the run computes what an
  evaluation computes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import FORMATS, SHAPES, random_stored  # noqa: E402


def paired(base: Callable[[], object], other: Callable[[], object], repeat: int) -> dict:
    """Time ``base`` and ``other`` in turns, ``repeat`` rounds after a warm-up of each.

    Returns:
        ``ratio``: median over rounds of ``t_base / t_other`` (above 1: ``other`` is faster),
        ``base_s`` / ``other_s``: the median seconds of each.
    """
    base(), other()
    tb, to = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        other()
        t2 = time.perf_counter()
        tb.append(t1 - t0)
        to.append(t2 - t1)
    return {"ratio": statistics.median(b / o for b, o in zip(tb, to)), "base_s": statistics.median(tb),
            "other_s": statistics.median(to)}


def block_rows(formats: list[str], paths: list[str], tokens: list[int], repeat: int) -> list[dict]:
    """Each (format, path, tokens) against float32 dense through one SmolLM2 block's linears."""
    from billm.packing.linear import PackedLinear

    g = torch.Generator().manual_seed(0)
    shapes = SHAPES["smollm2"]
    dense = [torch.randn(r, c, generator=g) for r, c in shapes]
    rows = []
    for fmt in formats:
        layers = [PackedLinear.from_stored(random_stored(fmt, r, c, g)) for r, c in shapes]
        for T in tokens:
            xs = {c: torch.randn(T, c, generator=g) for c in {c for _, c in shapes}}

            def fp32():
                for w, (_, c) in zip(dense, shapes):
                    F.linear(xs[c], w)

            for path in paths:
                def packed():
                    for m, (_, c) in zip(layers, shapes):
                        m(xs[c])

                for m in layers:
                    m.kernel = path
                with torch.no_grad():
                    r = paired(fp32, packed, repeat)
                rows.append({"what": "block", "format": fmt, "path": path, "tokens": T, **r})
                print(f"| {FORMATS[fmt]} | {path} | {T} | {r['base_s'] * 1e3:.1f} | {r['other_s'] * 1e3:.1f} "
                      f"| {r['ratio']:.2f}x |", flush=True)
    return rows


def model_rows(checkpoint: str, paths: list[str], windows: int, repeat: int, data_dir) -> list[dict]:
    """Whole-model forward on WikiText-2 test windows of 2048 tokens: the packed checkpoint against float32 SmolLM2."""
    import billm
    from billm.data import get_eval_tokens
    from billm.eval.perplexity import make_windows, window_nll
    from billm.model import load_model

    fp32, tok = load_model("smollm2")
    packed = billm.load(checkpoint)
    ids = make_windows(get_eval_tokens("wikitext2", tok, 2048, data_dir=data_dir), 2048, windows)  # (windows, 2048)

    def run(model, nll: list):
        def fn():
            nll.clear()
            for w in ids:
                nll.append(float(window_nll(model(input_ids=w[None], use_cache=False).logits, w[None]).mean()))
        return fn

    rows = []
    for path in paths:
        billm.set_kernel(packed, path)
        nll_f, nll_p = [], []
        with torch.inference_mode():
            r = paired(run(fp32, nll_f), run(packed, nll_p), repeat)
        ppl_f, ppl_p = (float(torch.tensor(n).mean().exp()) for n in (nll_f, nll_p))
        rows.append({"what": "model", "path": path, "tokens": 2048, "windows": windows, "ppl_fp32": ppl_f,
                     "ppl_packed": ppl_p, **r})
        print(f"| SmolLM2-135M ({windows} x 2048 tokens) | {path} | {r['base_s']:.2f} s | {r['other_s']:.2f} s "
              f"| {r['ratio']:.2f}x | {ppl_f:.2f} | {ppl_p:.2f} |", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=lambda v: [int(t) for t in v.split(",") if t], default=[128, 2048])
    ap.add_argument("--formats", default="billm,gptq2,slim2")
    ap.add_argument("--paths", default="dense,dequant", help="packed paths timed against float32 (auto, dense, dequant, lut)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--checkpoint", help="a billm checkpoint of SmolLM2-135M: also time the whole model")
    ap.add_argument("--windows", type=int, default=1, help="WikiText-2 windows of 2048 tokens a model call")
    ap.add_argument("--data-dir", help="where wikitext-2-raw lies (default $BILLM_DATA_DIR)")
    ap.add_argument("--skip-block", action="store_true", help="only the whole model")
    ap.add_argument("--json", help="also write every figure to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = "python benchmarks/bench_prompt.py " + " ".join(sys.argv[1:])
    print(f"# {cmd}\n# {args.threads} threads, torch {torch.__version__}; ratio = median over {args.repeat} rounds of "
          "t_fp32 / t_packed (above 1: packed faster)\n")
    paths = args.paths.split(",")
    rows = []
    if not args.skip_block:
        print("| format | path | tokens | fp32 ms | packed ms | packed speed vs fp32 |\n|---|---|---:|---:|---:|---:|")
        rows += block_rows(args.formats.split(","), paths, args.tokens, args.repeat)
        print()
    if args.checkpoint:
        print("| model | path | fp32 s | packed s | packed speed vs fp32 | ppl fp32 | ppl packed |\n"
              "|---|---|---:|---:|---:|---:|---:|")
        rows += model_rows(args.checkpoint, paths, args.windows, args.repeat, args.data_dir)
        print()
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "threads": args.threads, "torch": torch.__version__,
                                               "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
