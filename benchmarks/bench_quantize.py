"""Whole-model BiLLM quantization time of SmolLM2-135M, split into phases, and its perplexity.

    python benchmarks/bench_quantize.py [--nsamples 64 --seqlen 512] [--eval-windows 16]

Phases: capture (embeddings up to block 0), hessian (statistics forward of each block + the
Cholesky work), search (salient columns + break point + binarization, per OBC block),
compensation (OBC error propagation), propagation (re-running each quantized block).
Calibration: C4 train windows from ``--data-dir`` (default ../shared/data). With
``--eval-windows N`` > 0, WikiText-2 test perplexity (GPTQ protocol, seqlen 2048, first N
windows) of full precision and of the quantized model is printed too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import billm
from billm.data import get_calibration_batches, get_eval_tokens
from billm.eval import perplexity
from billm.model.loading import load_model


def _parse(kv: str) -> tuple[str, object]:
    key, _, value = kv.partition("=")
    low = value.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--preset", default="default", choices=["default", "reference", "paper"])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. search_domain=weight centred=false")
    ap.add_argument("--eval-windows", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = {"reference": billm.BiLLMConfig.reference, "paper": billm.BiLLMConfig.paper,
           "default": billm.BiLLMConfig}[args.preset](**dict(_parse(kv) for kv in args.set))
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads, preset {args.preset}")

    t0 = time.perf_counter()
    model, tok = load_model(None)
    t_load = time.perf_counter() - t0
    calib = get_calibration_batches("c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                    data_dir=args.data_dir)
    out: dict = {"nsamples": args.nsamples, "seqlen": args.seqlen, "preset": args.preset, "config": cfg.to_dict(),
                 "load_s": t_load}
    if args.eval_windows:
        test = get_eval_tokens("wikitext2", tok, args.eval_seqlen, data_dir=args.data_dir)
        out["fp_ppl"] = perplexity(model, test, seqlen=args.eval_seqlen, max_windows=args.eval_windows).ppl

    t0 = time.perf_counter()
    report = billm.quantize(model, calib, cfg, batch_size=args.batch_size)
    wall = time.perf_counter() - t0
    out.update(wall_s=wall, phases=report.phases, weight_bits=report.weight_bits, linears=len(report.layers),
               mean_rel_err=sum(r.hessian_rel_err for r in report.layers) / len(report.layers))
    print(f"\nquantize {args.nsamples}x{args.seqlen} calibration: {wall:.1f}s wall "
          f"({len(report.layers)} linears, {report.weight_bits:.3f} weight bits, mean rel. output error "
          f"{out['mean_rel_err']:.3f})")
    for phase, sec in report.phases.items():
        print(f"  {phase:13} {sec:8.1f}s  {100 * sec / wall:5.1f}%")
    if args.eval_windows:
        out["billm_ppl"] = perplexity(model, test, seqlen=args.eval_seqlen, max_windows=args.eval_windows).ppl
        print(f"WikiText-2 test ppl (seqlen {args.eval_seqlen}, first {args.eval_windows} windows): "
              f"full precision {out['fp_ppl']:.2f}, BiLLM {out['billm_ppl']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
