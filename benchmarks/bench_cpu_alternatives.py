"""The CPU decoding alternative that lost: an int8 code cache, against the lookup tables and the reference.

    python benchmarks/bench_cpu_alternatives.py [--rows 4096 --cols 4096] [--threads 2]

The issue allowed two designs for decoding on CPU. This script measures the one not kept. It keeps,
per BiLLM layer, one int8 per weight (group slot, first sign, second sign) unpacked once. Each call
gathers the scales, applies the signs and runs ``F.linear``. The kept design (byte lookup tables
over the packed planes, :mod:`billm.kernels.lut`) and the decode-then-matmul reference run in the
same process on the same random layer; the figures are milliseconds a token and ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import random_stored  # noqa: E402

from billm.methods.billm import billm_unpack  # noqa: E402
from billm.packing.linear import PackedLinear  # noqa: E402


class Int8Cache:
    """One int8 per weight: bits 0-1 the scale slot (0 concentrated, 1 sparse, 2 salient), bit 2 the
    first sign, bit 3 the second sign (salient columns)."""

    def __init__(self, st) -> None:
        s1, sal, sparse, s2 = billm_unpack(st.tensors, st.shape, st.meta)
        slot = torch.where(sal.unsqueeze(0), 2, sparse.to(torch.int64)).to(torch.int8)
        self.code = (slot | (s1.to(torch.int8) << 2) | (s2.to(torch.int8) << 3)).contiguous()  # (r, c)
        r, c = st.shape
        bs = st.meta["blocksize"]
        self.scales = st.tensors["scales"].float().permute(2, 0, 1).reshape(r, -1).contiguous()  # (r, nb * 4)
        self.blk4 = (torch.arange(c) // bs * 4)  # (c,)
        self.sal = sal

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        code = self.code.to(torch.int64)
        a = torch.gather(self.scales, 1, (code & 3) + self.blk4)  # (r, c)
        w = a * (((code >> 2) & 1) * 2 - 1)
        a2 = torch.gather(self.scales, 1, (self.blk4 + 3).expand_as(code))
        w = w + torch.where(self.sal, a2 * (((code >> 3) & 1) * 2 - 1), 0.0)
        return F.linear(x, w)


def _ms(fn, repeat: int = 7) -> float:
    fn()
    t = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t.append(time.perf_counter() - t0)
    return statistics.median(t) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    st = random_stored("billm", args.rows, args.cols, g)
    layer = PackedLinear.from_stored(st)
    cache = Int8Cache(st)
    x = torch.randn(1, args.cols)
    with torch.no_grad():
        layer.kernel = "dequant"
        ref = layer(x)
        assert torch.allclose(cache(x), ref, rtol=1e-4, atol=1e-3)
        t_deq = _ms(lambda: layer(x))
        layer.kernel = "lut"
        t_lut = _ms(lambda: layer(x))
        t_int8 = _ms(lambda: cache(x))
        w = layer.weight
        t_fp32 = _ms(lambda: F.linear(x, w))
    print(f"# python benchmarks/bench_cpu_alternatives.py --rows {args.rows} --cols {args.cols} --threads {args.threads}")
    print(f"BiLLM {args.rows}x{args.cols}, one token, {args.threads} threads: ms a call (speed vs the dequant reference)")
    for name, t, mem in (("dequant (reference)", t_deq, "packed"), ("int8 code cache", t_int8, "packed + 8 bits/weight"),
                         ("lut (kept)", t_lut, "packed + ~2 bits/weight"), ("fp32 dense", t_fp32, "32 bits/weight")):
        print(f"  {name:22s} {t:8.2f} ms  {t_deq / t:6.2f}x   memory: {mem}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
