"""Whole-model quantization time of SmolLM2-135M against the protocol's floor, measured in the same run.

    python benchmarks/bench_quantize.py [--method billm] [--nsamples 64 --seqlen 512] [--eval-windows 16]

The floor is what no implementation of the protocol can skip: the calibration set's forward up
to block 0, then for every block one statistics forward of the full-precision block, the
Hessian products ``x^T x`` of each distinct linear input (one GEMM per batch), and one
propagation forward. It is measured in the same run, on a second copy of the model with its own
activations, by running exactly those steps and nothing else, interleaved block by block with the
real run (``billm.quantize`` with ``--method``, a compare spec such as ``billm``, ``billm:plus`` or
``gptq:w2g128``): the floor's block i runs just before the real run's block i, so a machine that
speeds up or slows down during the run slows both alike. The floor's seconds are taken out of the
real run's wall time (and out of its hessian phase, where they fall), and the ratio is printed.
The run's own phases: capture, hessian (statistics forward, Hessian sums and their
preparation, metrics, packing), search, compensation (OBC error propagation), propagation.
Calibration: C4 train windows from ``--data-dir`` (default ../shared/data). With
``--eval-windows N`` > 0, WikiText-2 test perplexity (GPTQ protocol, seqlen 2048, first N
windows) of full precision and of the quantized model is printed too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

import billm
from billm.data import get_calibration_batches, get_eval_tokens
from billm.eval import perplexity
from billm.methods.registry import config_from_spec
from billm.model.loading import load_model
from billm.model.walker import capture_inputs, find_blocks, find_linears, run_batch
from billm.driver import _as_batches, shared_input_groups


def floor_steps(model: nn.Module, calib: torch.Tensor, batch_size: int, uses_hessian: bool, out: dict) -> Iterator[int]:
    """The protocol's irreducible steps on ``model`` (which it leaves unquantized), a block at a time.

    Adds the seconds of each step to ``out`` (capture, statistics_forward, hessian_products,
    propagation_forward) and yields each block's index once its steps are done (the capture runs
    with block 0)."""
    batches = _as_batches(calib, batch_size)
    model.eval()
    t0 = time.perf_counter()
    inputs = capture_inputs(model, batches, device="cpu", offload="cpu")
    out["capture"] += time.perf_counter() - t0
    _, blocks = find_blocks(model)
    groups = None
    for i, block in enumerate(blocks):
        if uses_hessian:
            linears = find_linears(block)
            groups = groups or shared_input_groups(block, linears, inputs, "cpu", i)  # untimed: a probe, once
            H = {g[0]: torch.zeros(linears[g[0]].in_features, linears[g[0]].in_features) for g in groups}
            seen: dict[str, torch.Tensor] = {}
            hooks = [block.get_submodule(n).register_forward_hook(
                lambda _m, inp, _o, n=n: seen.__setitem__(n, inp[0])) for n in H]
            for b in range(len(batches)):
                t0 = time.perf_counter()
                run_batch(block, inputs, b, "cpu", i)
                t1 = time.perf_counter()
                for n, x in seen.items():
                    x = x.reshape(-1, x.shape[-1]).float()
                    H[n].addmm_(x.t(), x)
                out["statistics_forward"] += t1 - t0
                out["hessian_products"] += time.perf_counter() - t1
                seen.clear()
            for h in hooks:
                h.remove()
            del H
        if i + 1 < len(blocks):
            t0 = time.perf_counter()
            for b in range(len(batches)):
                inputs.hidden[b] = run_batch(block, inputs, b, "cpu", i)
            out["propagation_forward"] += time.perf_counter() - t0
        yield i


@contextlib.contextmanager
def interleaved_floor(steps: Iterator[int], spent: list[float]):
    """While open, every block the real run starts first lets ``steps`` run the floor's same block;
    ``spent[0]`` sums the seconds that took (they are inside the real run's wall time)."""
    qmod = importlib.import_module("billm.quantize")
    real = qmod.accumulate_hessians

    def step_then_accumulate(run, i):
        t0 = time.perf_counter()
        if next(steps) != i:
            raise RuntimeError("the floor and the real run are out of step")
        spent[0] += time.perf_counter() - t0
        return real(run, i)

    qmod.accumulate_hessians = step_then_accumulate
    try:
        yield
    finally:
        qmod.accumulate_hessians = real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--method", default="billm", help="a compare spec: billm, billm:plus, gptq:w2g128, ...")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-floor", action="store_true", help="skip the floor measurement")
    ap.add_argument("--eval-windows", type=int, default=0)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_spec(args.method)
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads, method {args.method}")

    t0 = time.perf_counter()
    model, tok = load_model(None)
    t_load = time.perf_counter() - t0
    calib = get_calibration_batches("c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                    data_dir=args.data_dir)
    out: dict = {"nsamples": args.nsamples, "seqlen": args.seqlen, "method": args.method, "config": cfg.to_dict(),
                 "threads": args.threads, "torch": torch.__version__, "load_s": t_load}
    floor = {"capture": 0.0, "statistics_forward": 0.0, "hessian_products": 0.0, "propagation_forward": 0.0}
    spent = [0.0]
    steps = None if args.no_floor else floor_steps(load_model(None)[0], calib, args.batch_size, cfg.uses_hessian, floor)
    if args.eval_windows:
        test = get_eval_tokens("wikitext2", tok, args.eval_seqlen, data_dir=args.data_dir)
        out["fp_ppl"] = perplexity(model, test, seqlen=args.eval_seqlen, max_windows=args.eval_windows).ppl

    with interleaved_floor(steps, spent) if steps is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        report = billm.quantize(model, calib, cfg, batch_size=args.batch_size, progress=False)
        wall = time.perf_counter() - t0 - spent[0]  # the real run alone
    report.phases["hessian"] -= spent[0]
    out.update(wall_s=wall, phases=report.phases, weight_bits=report.weight_bits, storage_bits=report.storage_bits,
               linears=len(report.layers),
               mean_rel_err=sum(r.hessian_rel_err for r in report.layers) / len(report.layers))
    print(f"\nquantize {args.nsamples}x{args.seqlen} calibration: {wall:.1f}s wall "
          f"({len(report.layers)} linears, {report.weight_bits:.3f} weight bits, {report.storage_bits:.3f} storage "
          f"bits, mean rel. output error {out['mean_rel_err']:.4f})")
    for phase, sec in report.phases.items():
        print(f"  {phase:13} {sec:8.1f}s  {100 * sec / wall:5.1f}%")
    if args.eval_windows:
        out["quantized_ppl"] = perplexity(model, test, seqlen=args.eval_seqlen, max_windows=args.eval_windows).ppl
        print(f"WikiText-2 test ppl (seqlen {args.eval_seqlen}, first {args.eval_windows} windows): "
              f"full precision {out['fp_ppl']:.2f}, {args.method} {out['quantized_ppl']:.2f}")
    if not args.no_floor:
        floor["total"] = sum(floor.values())
        out["floor"] = floor
        out["floor_ratio"] = wall / floor["total"]
        print(f"floor {floor['total']:.1f}s, measured block by block beside the run ("
              + ", ".join(f"{k} {v:.1f}s" for k, v in floor.items() if k != "total")
              + f"); actual / floor = {out['floor_ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
