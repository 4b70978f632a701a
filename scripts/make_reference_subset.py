"""Write tests/data/billm_reference_q_proj.safetensors.xz: the q_proj part of the shared reference file.

The reference-fidelity test (tests/test_reference.py) checks that our ``reference`` preset
reproduces the public BiLLM implementation on real SmolLM2 block-0 layers (docs/methods.md, "Paper and reference variants"). The
full file, ``../shared/data/reference/billm_reference_block0.safetensors`` (20 MB), lives outside
the repository, so a plain clone would skip the test. This script copies the smaller of its two
layers, ``q_proj`` (576x576), into the repository: three float32 tensors, unchanged bit for bit,

    q_proj.weight     (576, 576)  the layer's weight
    q_proj.hessian    (576, 576)  2/nsamples * sum x x^T (16 C4 windows of 512 tokens), undamped
    q_proj.quantized  (576, 576)  what the public BiLLM implementation returns for them

as one safetensors file compressed with xz (about 1.6 MB; 4 MB uncompressed). The test
decompresses it in memory.

The layer is kept whole on purpose: a subset of its rows would NOT do. The salient-column search
ranks columns by the salience summed over all rows and scores each candidate by the error over
all rows, and the break-point candidates are quantiles of |salience| over every entry of the
block; so the discrete choices, and with them the reference output, hold only for the complete
layer. (Columns cannot be cut either: the OBC compensation couples every column to all later
ones through the Hessian.)

Run from the repository root after the shared file changes::

    python scripts/make_reference_subset.py [--source PATH] [--out PATH]

The output is deterministic (same input, same bytes).
"""

from __future__ import annotations

import argparse
import lzma
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "reference" / "billm_reference_block0.safetensors"
OUT = REPO / "tests" / "data" / "billm_reference_q_proj.safetensors.xz"
LAYER = "q_proj"
FIELDS = ("weight", "hessian", "quantized")


def make_subset(source: Path = SOURCE, out: Path = OUT) -> Path:
    """Copy ``q_proj.{weight,hessian,quantized}`` of ``source`` to the xz-compressed ``out``; returns ``out``."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(source), "pt") as f:
        tensors = {f"{LAYER}.{field}": f.get_tensor(f"{LAYER}.{field}").contiguous() for field in FIELDS}
        what = (f.metadata() or {}).get("what", "")
    # One metadata key: safetensors writes a map's keys in no fixed order, and the bytes must not vary.
    metadata = {"what": f"{LAYER} (the whole layer) of {source.name}, by scripts/make_reference_subset.py. {what}"}
    data = lzma.compress(save(tensors, metadata=metadata), preset=9 | lzma.PRESET_EXTREME)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE, help=f"the shared reference file (default {SOURCE})")
    ap.add_argument("--out", type=Path, default=OUT, help=f"where to write (default {OUT})")
    args = ap.parse_args(argv)
    if not args.source.is_file():
        ap.error(f"reference file not found: {args.source}")
    out = make_subset(args.source, args.out)
    print(f"wrote {out} ({out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
