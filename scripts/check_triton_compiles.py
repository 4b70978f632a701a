"""Compile every Triton kernel of billm for a GPU target, on a machine without a GPU.

    python scripts/check_triton_compiles.py [--arch 90] [--quick]

Triton's interpreter (what the tests run the kernels in on the CPU) executes a kernel as NumPy and
accepts code that the compiler rejects (a helper returning tensors of two shapes, say). This script
runs the compiler itself, Triton source to PTX and cubin, for the GPU architecture ``--arch``
(90: Hopper, the H100 and H200), over the constant sets the launches use: BiLLM with and without
means, blocks of 128 and 20 columns; grid formats of 1 to 3 bits, with and without a column map,
signed, with zeros, with shifts; one token (GEMV) and 16-token ``tl.dot`` tiles in fp16 and exact
fp32; the decoders writing fp16 and fp32. Exit status 0 when every kernel compiles; each failure is
printed with Triton's message. It must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def cases(quick: bool):
    """(kernel name, pointer types, constexprs) to compile."""
    u8 = "*u8"
    out = []
    for bt, dot, xt in ((1, 1, "*fp16"), (16, 1, "*fp16"), (16, 0, "*fp32")):
        br = 128 if bt == 1 else 64
        for bs, means in ((128, False), (20, True)):
            out.append(("_billm_kernel", {"x_ptr": xt, "s1_ptr": u8, "grp_ptr": u8, "s2_ptr": u8, "sal_ptr": u8,
                                          "sc_ptr": "*fp16", "mu_ptr": "*fp16"},
                        dict(BS=bs, BB=(bs + 7) // 8, HAS_MEANS=means, DOT=dot, BLOCK_T=bt, BLOCK_R=br, BLOCK_K=32)))
        grids = [(2, False, False, True, False), (3, True, False, True, False), (1, False, True, False, True)]
        for bits, cols, signed, zero, shift in grids[:1] if quick else grids:
            out.append(("_grid_kernel", {"x_ptr": xt, "planes_ptr": u8, "cols_ptr": "*i64"},
                        dict(BITS=bits, GS=128, GB=16, HAS_COLS=cols, SIGNED=signed, HAS_ZERO=zero, HAS_SHIFT=shift,
                             DOT=dot, BLOCK_T=bt, BLOCK_R=br, BLOCK_K=32)))
    for wt in ("*fp16", "*fp32"):
        out.append(("_billm_decode_kernel", {"s1_ptr": u8, "grp_ptr": u8, "s2_ptr": u8, "sal_ptr": u8,
                                             "sc_ptr": "*fp16", "mu_ptr": "*fp16", "w_ptr": wt},
                    dict(BS=128, BB=16, HAS_MEANS=True, BLOCK_R=64, BLOCK_K=32)))
        out.append(("_grid_decode_kernel", {"planes_ptr": u8, "cols_ptr": "*i64", "w_ptr": wt},
                    dict(BITS=2, GS=128, GB=16, HAS_COLS=True, SIGNED=False, HAS_ZERO=True, HAS_SHIFT=False,
                         BLOCK_R=64, BLOCK_K=32)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: Hopper)")
    ap.add_argument("--quick", action="store_true", help="one grid variant per tile kind instead of three")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("unset TRITON_INTERPRET: the interpreter compiles nothing")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from billm.kernels import triton_kernels as tk

    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    t0 = time.perf_counter()
    for name, ptrs, consts in cases(args.quick):
        fn = getattr(tk, name)
        sig = {a: "constexpr" if a in consts else ptrs.get(a, "*fp32") if a.endswith("_ptr") else "i32"
               for a in fn.arg_names}
        try:
            triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target)
        except Exception as e:  # noqa: BLE001  (every failure is reported, then the exit status says it)
            failed += 1
            print(f"FAILED {name} {consts}:\n{e}\n", file=sys.stderr)
    n = len(cases(args.quick))
    print(f"{n - failed} of {n} kernels compiled for sm_{args.arch} in {time.perf_counter() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
