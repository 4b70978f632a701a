"""Write tests/data/arb_reference_block0.safetensors: the ARB-LLM loop oracle's output on two real layers.

``tests/oracle.py's arb_reference_loop`` is ARB-RC as the public ARB-LLM code runs it
(ZHITENGLI/ARB-LLM, ``arb-rc``, Hessian salience, blocksize 128, percdamp 0.01, one break point).
This script runs it on the real SmolLM2 block-0 ``q_proj`` (576x576) and ``down_proj`` (576x1536)
of the shared reference file, twice each:

    {layer}.public.*  exact-zero weights signed 0, as the public code's ``torch.sign`` does
    {layer}.signed.*  exact zeros signed +1, as billm stores every sign (docs/methods.md)

Each run keeps only its choices and scales (``ArbReference.to_tensors``: salient columns, the
sparse-group and sign bit planes packed, the zero signs, break points, row and column scales, in
float32); the dequantized weights are rebuilt from them bit for bit (``ArbReference.from_tensors``),
and the metadata holds the SHA-256 of each run's float32 weights. ``tests/test_arb.py`` checks
billm's ``arb:reference`` against it. About 1.3 MB.

Run from the repository root after the oracle or the shared file changes::

    python scripts/make_arb_reference.py [--source PATH] [--out PATH]

The metadata records the script, the commit and the date; the tensors are deterministic.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "reference" / "billm_reference_block0.safetensors"
OUT = REPO / "tests" / "data" / "arb_reference_block0.safetensors"
LAYERS = ("q_proj", "down_proj")
RUNS = {"public": 0.0, "signed": 1.0}  # run name -> the sign given to an exact zero


def q_digest(q) -> str:
    """SHA-256 of a float32 weight's bytes (row-major)."""
    return hashlib.sha256(q.to("cpu").float().contiguous().numpy().tobytes()).hexdigest()


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tests/oracle.py",
                                "scripts/make_arb_reference.py"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev.stdout.strip() + (" (oracle or script modified)" if dirty.stdout.strip() else "")


def make_reference(source: Path = SOURCE, out: Path = OUT) -> Path:
    """Run the oracle on both layers, both runs; write ``out`` atomically; returns ``out``."""
    import torch
    from safetensors.torch import load_file, save_file

    sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]
    from oracle import ArbReference, arb_reference_loop
    from billm.io import write_atomic

    torch.set_num_threads(1)  # the float32 sums round the same way on every run (tests/test_arb.py pins it too)
    src = load_file(str(source))
    tensors, meta = {}, {}
    for layer in LAYERS:
        W, H = src[f"{layer}.weight"], src[f"{layer}.hessian"]
        for run, zero_sign in RUNS.items():
            ref = arb_reference_loop(W, H, zero_sign=zero_sign)
            packed = ref.to_tensors()
            back = ArbReference.from_tensors(packed)
            if not torch.equal(back.q, ref.q) or not torch.equal(back.signs, ref.signs) \
                    or not torch.equal(back.groups, ref.groups):
                raise RuntimeError(f"{layer}.{run}: the stored form does not rebuild the oracle's output")
            tensors.update({f"{layer}.{run}.{k}": v for k, v in packed.items()})
            meta[f"{layer}.{run}.q_sha256"] = q_digest(ref.q)
            print(f"{layer}.{run}: salient {[len(c) for c in ref.salient_columns]}, "
                  f"zero signs {int(packed['zero_signs'].shape[0])}")
    meta.update({
        "what": "ARB-RC loop oracle (tests/oracle.py's arb_reference_loop: the public ARB-LLM code's arb-rc, "
                "hessian salience, blocksize 128, percdamp 0.01, iters 15, k 1..49, 81 quantile break points) "
                f"on {', '.join(LAYERS)} of {source.name}; runs: public (exact zeros signed 0, as torch.sign), "
                "signed (exact zeros signed +1, as billm stores)",
        "script": "scripts/make_arb_reference.py",
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
    })
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # billm.io: fsync, one rename
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help=f"the shared reference file (default {SOURCE})")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    args = ap.parse_args(argv)
    if not args.source.is_file():
        ap.error(f"reference file not found: {args.source}")
    out = make_reference(args.source, args.out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
