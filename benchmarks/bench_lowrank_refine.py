"""The low-rank binary method's refinement under the whole Hessian, on the two real SmolLM2 layers.

    python benchmarks/bench_lowrank_refine.py [--specs lowrank:b1+rf0,lowrank:b1+rf2,...] [--json FILE]

Each spec quantizes ``q_proj`` and ``down_proj`` of SmolLM2-135M's block 0 with their calibration Hessians
(``../shared/data/reference``, the file the ``reference`` preset reproduces) and prints the layer's output
error ``tr(D H D^T) / tr(W H W^T)`` (``D = W - Q``), the error the refinement lowers, beside the seconds it
took on one thread. The default specs end with two BiLLM settings for comparison (``rank`` 0: not low-rank).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="lowrank:b1+rf0,lowrank:b1+rf2,lowrank:b1+rf4,billm:reference,billm:tiny")
    ap.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    import billm
    from billm.methods import method_of
    from billm.methods.obc import hessian_error

    path = Path(args.data_dir) / "reference" / "billm_reference_block0.safetensors"
    if not path.exists():
        print(f"missing {path}", file=sys.stderr)
        return 2
    layers = load_file(str(path))
    rows = []
    for name in ("q_proj", "down_proj"):
        W, H = layers[f"{name}.weight"], layers[f"{name}.hessian"]
        for spec in args.specs.split(","):
            cfg = billm.config_from_spec(spec)
            t0 = time.perf_counter()
            res = method_of(cfg)(W.clone(), H.clone(), cfg)
            seconds = time.perf_counter() - t0
            row = {"layer": name, "spec": spec, "output_error": hessian_error(W, res.q, H)[1], "seconds": seconds,
                   "storage_bits": res.stored.storage_bits, "rank": res.info.get("rank", 0)}
            rows.append(row)
            print(f"{name:10s} {spec:24s} rank {row['rank']:4d}  {row['storage_bits']:.3f} bits  "
                  f"output error {row['output_error']:.4f}  {seconds:5.1f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": 1, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
