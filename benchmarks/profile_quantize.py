"""Where a billm quantize run spends its time, function by function (exclusive wall seconds).

    python benchmarks/profile_quantize.py [--method billm] [--nsamples 64 --seqlen 512] [--md out.md]

Every function listed in ``SECTIONS`` is wrapped, wherever billm's modules imported it, by a timer
that charges its wall time to its section minus the time of wrapped calls nested inside it (so
the sections add up to the run, and "other" is what no section names). The forward passes are
told apart by the step that called them (statistics or propagation). The wrappers cost about a
microsecond per call; the run is otherwise the plain :func:`billm.quantize`.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import time
from pathlib import Path

import torch

import billm
from billm.data import get_calibration_batches
from billm.methods.registry import config_from_spec
from billm.model.loading import load_model

# section name -> the functions charged to it, as "module:qualified.name"
SECTIONS: dict[str, list[str]] = {
    "capture (embeddings)": ["billm.model.walker:capture_inputs"],
    "grouping probe": ["billm.quantize:shared_input_groups"],
    "forward": ["billm.model.walker:run_batch"],
    "output copies": ["billm.model.walker:to_host"],
    "hessian: accumulate": ["billm.methods.obc:HessianAccumulator.add_batch"],
    "hessian: mirror": ["billm.methods.obc:HessianAccumulator.H"],
    "hessian: prepare (damp, cholesky, inverse)": ["billm.methods.obc:prepare_hessian",
                                                   "billm.methods.obc:damped_hessian"],
    "search: salient columns": ["billm.methods.search:search_salient_columns"],
    "search: break point": ["billm.methods.search:break_candidates", "billm.methods.search:search_break_point",
                            "billm.methods.search:split_masks", "billm.methods.billm:salience"],
    "binarize groups": ["billm.methods.billm:encode_groups", "billm.methods.binarize:binarize_params"],
    "intra-block / gptq columns": ["billm.methods.gptq:gptq_block"],
    "refit": ["billm.methods.billm:refit_codes"],
    "decode (check and propagation)": ["billm.packing.formats:StoredWeight.values"],
    "pack": ["billm.methods.billm:stored_billm", "billm.packing.linear:PackedLinear.from_stored"],
    "metrics": ["billm.methods.obc:hessian_error"],
    "free memory": ["billm.memory:return_freed_memory"],
    "block moves": ["torch.nn.modules.module:Module.to"],
}


class Clock:
    """Exclusive wall time per section, with a stack for nested wrapped calls."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.stack: list[list[float]] = []  # per open call: [time spent in nested wrapped calls]
        self.step = ""

    def wrap(self, section: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            name = f"forward ({self.step})" if section == "forward" else section
            self.stack.append([0.0])
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                nested = self.stack.pop()[0]
                if self.stack:
                    self.stack[-1][0] += took
                self.seconds[name] = self.seconds.get(name, 0.0) + took - nested
                self.calls[name] = self.calls.get(name, 0) + 1
        return timed

    def stepping(self, step: str, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            before, self.step = self.step, step
            try:
                return fn(*args, **kwargs)
            finally:
                self.step = before
        return inner


def _patch(clock: Clock) -> None:
    for section, targets in SECTIONS.items():
        for target in targets:
            mod_name, _, qual = target.partition(":")
            owner = importlib.import_module(mod_name)
            *path, attr = qual.split(".")
            for p in path:
                owner = getattr(owner, p)
            raw = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)
            if isinstance(raw, property):
                setattr(owner, attr, property(clock.wrap(section, raw.fget)))
                continue
            if isinstance(raw, classmethod):
                setattr(owner, attr, classmethod(clock.wrap(section, raw.__func__)))
                continue
            new = clock.wrap(section, raw)
            setattr(owner, attr, new)
            if not isinstance(owner, type):  # also where other billm modules imported it by name
                for m in list(sys.modules.values()):
                    if getattr(m, "__name__", "").startswith("billm") and getattr(m, attr, None) is raw:
                        setattr(m, attr, new)
    q = importlib.import_module("billm.quantize")
    q.accumulate_hessians = clock.stepping("statistics", q.accumulate_hessians)
    q.propagate = clock.stepping("propagation", q.propagate)
    q.shared_input_groups = clock.stepping("probe", q.shared_input_groups)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--method", default="billm", help="a compare spec, e.g. billm, billm:plus, gptq:w2g128")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--md", default=None, help="also write the table here (markdown)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cfg = config_from_spec(args.method)
    model, tok = load_model(None)
    calib = get_calibration_batches("c4", tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=0,
                                    data_dir=args.data_dir)
    clock = Clock()
    _patch(clock)
    t0 = time.perf_counter()
    billm.quantize(model, calib, cfg, batch_size=args.batch_size, progress=False)
    wall = time.perf_counter() - t0
    rows = sorted(clock.seconds.items(), key=lambda kv: -kv[1])
    other = wall - sum(clock.seconds.values())
    lines = [f"`{args.method}` on SmolLM2-135M, {args.nsamples} x {args.seqlen} C4 calibration, "
             f"{torch.get_num_threads()} threads: {wall:.1f} s wall.", "",
             "| section | seconds | share | calls |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v:.2f} | {100 * v / wall:.1f} % | {clock.calls[k]} |" for k, v in rows]
    lines.append(f"| other (loops, bookkeeping, unwrapped code) | {other:.2f} | {100 * other / wall:.1f} % | |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        Path(args.md).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "wall_s": wall, "sections": clock.seconds,
                                               "calls": clock.calls, "other_s": other}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
