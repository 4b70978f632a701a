"""Block reconstruction on one real SmolLM2 block: how much of the block's output error each option removes.

    python benchmarks/bench_reconstruct.py [--specs lowrank:b1,lowrank:b055] [--block 5] [--steps 100]
                                           [--nsamples 24 --heldout 8 --seqlen 512] [--json FILE]

For each spec, block ``--block`` of the embedded SmolLM2-135M is quantized (the other blocks stay full
precision) on ``--nsamples`` C4 sequences, then three copies of it are compared on those sequences
and on ``--heldout`` other C4 sequences, by the relative squared error of the block's output
against the full-precision block's (on the same full-precision inputs):

* ``none``: as quantized;
* ``scales``: ``--steps`` steps of block reconstruction on the scales (``--reconstruct``);
* ``scales+signs``: the same steps, the format's sign planes tuned too (``--reconstruct-signs``; only
  formats that declare sign planes, e.g. ``lowrank``).

``--variants`` picks which of them run (``none`` always).

The held-out error says whether what was tuned carries beyond the tuning text. Seconds are the tuning's.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def block_error(block, inputs, targets, index: int) -> float:
    """Relative squared error of ``block``'s output against ``targets`` over every captured batch."""
    num = den = 0.0
    with torch.no_grad():
        for b, (h, t) in enumerate(zip(inputs.hidden, targets)):
            out = block(h.clone(), **inputs.for_block(b, index))
            out = out[0] if isinstance(out, (tuple, list)) else out
            num += float((out.float() - t.float()).pow(2).sum())
            den += float(t.float().pow(2).sum())
    return num / den


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="lowrank:b1,lowrank:b055")
    ap.add_argument("--block", type=int, default=5)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--sign-lr", type=float, default=0.05)
    ap.add_argument("--nsamples", type=int, default=24)
    ap.add_argument("--heldout", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="scales,scales+signs",
                    help="comma-separated: scales, scales+signs")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import billm
    from billm.data import get_calibration_batches
    from billm.methods import get_method
    from billm.model import load_model
    from billm.model.walker import capture_inputs, find_blocks, run_block
    from billm.reconstruct import Settings, reconstruct_block

    fp, tok = load_model("smollm2")
    ids = get_calibration_batches("c4", tok, nsamples=args.nsamples + args.heldout, seqlen=args.seqlen, seed=0,
                                  data_dir=args.data_dir)
    ids = torch.cat(list(ids)) if isinstance(ids, (list, tuple)) else ids
    tune_ids, held_ids = ids[:args.nsamples], ids[args.nsamples:]
    k = args.block

    def block_inputs(model, batch_ids):
        """Block k's inputs (full-precision blocks before it) in batches of 4, and the fp block's outputs."""
        inputs = capture_inputs(model, list(batch_ids.split(4)))
        blocks = find_blocks(model)[1]
        for i in range(k):
            run_block(blocks[i], inputs, "cpu", "cpu", i, in_place=True)
        return inputs

    fp_block = find_blocks(fp)[1][k]
    tune_in, held_in = block_inputs(fp, tune_ids), block_inputs(fp, held_ids)
    tune_t = run_block(fp_block, tune_in, "cpu", "cpu", k)
    held_t = run_block(fp_block, held_in, "cpu", "cpu", k)
    rows = []
    for spec in [s for s in args.specs.split(",") if s]:
        method, _, opts = spec.partition(":")
        cfg = get_method(method).config.from_spec(opts).replace(include=(f"model.layers.{k}.*",))
        model = copy.deepcopy(fp)
        t0 = time.perf_counter()
        rep = billm.quantize(model, tune_ids, cfg, batch_size=4, progress=False)
        quantized = find_blocks(model)[1][k]
        row = {"spec": spec, "block": k, "storage_bits": rep.storage_bits, "quantize_seconds": time.perf_counter() - t0}
        for name in ["none"] + [v for v in args.variants.split(",") if v and v != "none"]:
            parts = set(name.split("+"))
            if name != "none" and not parts <= {"scales", "signs"}:
                raise SystemExit(f"unknown variant {name!r}: scales or scales+signs")
            blk = copy.deepcopy(quantized)
            secs = 0.0
            if name != "none":
                st = reconstruct_block(blk, tune_in.hidden, [tune_in.for_block(b, k) for b in range(len(tune_t))], tune_t,
                                       Settings(args.steps, args.lr, 1, 0, "signs" in parts, args.sign_lr),
                                       torch.device("cpu"), k)
                secs = st.seconds
                if "signs" in parts:
                    row[f"{name}_flipped"] = st.flipped
            row[name] = {"tune_err": block_error(blk, tune_in, tune_t, k), "heldout_err": block_error(blk, held_in, held_t, k),
                         "seconds": secs}
            print(f"{spec:16s} {name:13s} tuned-on error {row[name]['tune_err']:.4f}  held-out error "
                  f"{row[name]['heldout_err']:.4f}  ({secs:.0f} s)", flush=True)
        rows.append(row)
    cmd = "python benchmarks/bench_reconstruct.py " + " ".join(sys.argv[1:])
    if args.json:
        Path(args.json).write_text(json.dumps({"command": cmd, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
