"""Per-layer time and peak memory of each BiLLM step at LLaMA-2-7B and -70B shapes, and projected whole runs.

    python benchmarks/bench_scaling.py [--tokens 512] [--slice-blocks 4] [--comp-rows 1024] [--out DIR]
    python benchmarks/bench_scaling.py --reproject docs/results/scaling/scaling.json   # projections only
    python benchmarks/bench_scaling.py --reproject docs/results/scaling/scaling.json --remeasure profile

Random weights, a synthetic Hessian, CPU only. Every measurement runs in a fresh subprocess that
builds its inputs, reads its resident memory (``psutil``) and high-water mark
(``getrusage(RUSAGE_SELF).ru_maxrss``), runs one step and reads the high-water mark again: the
step's peak is the difference. Steps, each through billm's own functions:

* ``accumulate``: :class:`~billm.methods.obc.HessianAccumulator` fed ``--tokens`` tokens (one
  ``add_batch``), then ``.H``; linear in tokens, projected to 128 x 2048.
* ``prepare``: :func:`~billm.methods.obc.prepare_hessian` (damping, Cholesky, inverse, Cholesky)
  up to 8192 columns; 11008 and 28672 from an ``a * cols^3`` fit.
* ``compensate``: :func:`~billm.methods.obc.obc_quantize` at the full column count with a one-line
  sign quantizer (its ``OBCTimes.compensate`` is the error propagation alone), and
  :func:`~billm.methods.obc.hessian_error`, which ``quantize_linear`` runs after every layer; both
  on ``--comp-rows`` rows and scaled by rows (each row is independent).
* ``quantize``: :func:`billm.driver.quantize_linear` (method, ``PackedLinear``, decode check) on
  the first ``--slice-blocks`` x 128 columns with the Hessian of those columns, BiLLM default and
  ``plus``; the search is per block, so a full layer is ``ceil(cols/128)`` blocks of it. Also the
  repacking (``billm_pack``) and one decode (``StoredWeight.values``) timed alone.
* ``validate``: whole 4096 x 4096 and 1024 x 8192 layers through ``quantize_linear``, against
  the sum the model predicts.
* ``profile``: one block's BiLLM search, its ``plus`` in-block column loop and one decode under
  ``torch.profiler``: operator count and bytes allocated, for the GPU estimate of those steps (they
  are not matrix products).

Synthetic Hessian: ``H = 2/T X^T X`` from ``X`` (T tokens, cols) standard normal with every 200th
channel 20x louder (LLM activations have a few outlier channels), accumulated by billm's own
accumulator; with T < cols it is rank-deficient and ``percdamp`` = 1 % of mean(diag) makes it
definite (timings do not depend on the spectrum unless the Cholesky is retried; none was).
Writes ``DIR/scaling.json`` (default ``docs/results/scaling``) and prints the projection tables.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

BS = 128  # BiLLM's OBC block (BiLLMConfig().blocksize)
TILE = 256  # HessianAccumulator's default tile
MODELS = {  # LLaMA-2 public configs: hidden, intermediate, blocks, kv dim (GQA)
    "7B": dict(hidden=4096, inter=11008, blocks=32, kv=4096),
    "70B": dict(hidden=8192, inter=28672, blocks=80, kv=1024),
}
CALIB = dict(nsamples=128, seqlen=2048, batch=8)  # the paper's calibration; billm.quantize's batch_size
GPUS = {  # peak dense throughput (TFLOP/s) and memory bandwidth (TB/s), vendor figures; fp32 without TF32
    "A100-80GB": dict(fp32=19.5, fp64=19.5, fp16=312.0, bw=2.0),
    "H100-80GB SXM": dict(fp32=67.0, fp64=67.0, fp16=989.0, bw=3.35),
}
EFF = dict(gemm=0.5, chol=0.3, bw=0.5)  # assumed fraction of peak reached
KW = 3  # float32 copies of W alive at once in quantize_linear (its clone, the method's clone, Q)
OP_US = (10.0, 50.0)  # assumed microseconds per operator call on a GPU (launch + dispatch + syncs): base, slow
H2D = 12e9  # assumed bytes/s between host and GPU for the calibration activations (pageable memory)


def linears(m: dict) -> list[tuple[str, int, int, str]]:
    """(name, rows, cols, hessian group) of one decoder block."""
    h, i, kv = m["hidden"], m["inter"], m["kv"]
    return [("q", h, h, "qkv"), ("k", kv, h, "qkv"), ("v", kv, h, "qkv"), ("o", h, h, "o"),
            ("gate", i, h, "gateup"), ("up", i, h, "gateup"), ("down", h, i, "down")]


def shapes() -> list[tuple[int, int]]:
    return sorted({(r, c) for m in MODELS.values() for _, r, c, _ in linears(m)})


# ---------------------------------------------------------------------------------------------- child side

def _child(spec: dict) -> dict:
    import gc
    import resource

    import torch
    from torch import nn

    try:
        import psutil
        rss_now = lambda: psutil.Process().memory_info().rss  # noqa: E731
    except ImportError:  # pragma: no cover
        rss_now = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # noqa: E731
    maxrss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731

    from billm import BiLLMConfig
    from billm.methods.billm import billm_block, intra_block_columns
    from billm.methods.obc import HessianAccumulator, OBCTimes, hessian_error, obc_quantize, prepare_hessian
    from billm.methods.registry import method_of
    from billm.methods.billm import billm_pack, billm_unpack
    from billm.driver import quantize_linear

    torch.manual_seed(0)
    kind = spec["kind"]

    def hessian(cols: int, tokens: int) -> "torch.Tensor":
        acc = HessianAccumulator(cols)
        for t0 in range(0, tokens, 2048):
            acc.add_batch(activations(min(2048, tokens - t0), cols).unsqueeze(0))
        return acc.H

    def activations(tokens: int, cols: int) -> "torch.Tensor":
        X = torch.randn(tokens, cols)  # (tokens, cols)
        X[:, ::200] *= 20.0
        return X

    def measure(fn):
        gc.collect()
        base, base_max = rss_now(), maxrss()
        t0 = time.perf_counter()
        out = fn()
        sec = time.perf_counter() - t0
        peak = maxrss()
        return out, {"seconds": sec, "rss_before": base, "maxrss_before": base_max, "maxrss_after": peak,
                     "peak_delta_bytes": peak - base, "peak_exceeded_before": peak > base_max}

    res: dict = {"spec": spec}
    if kind == "accumulate":
        cols, tokens = spec["cols"], spec["tokens"]
        X = activations(tokens, cols).unsqueeze(0)  # (1, tokens, cols)
        HessianAccumulator(512).add_batch(activations(256, 512).unsqueeze(0))  # warm-up (first BLAS calls)
        acc = HessianAccumulator(cols)
        _, res["step"] = measure(lambda: (acc.add_batch(X), acc.H))
    elif kind == "prepare":
        cols = spec["cols"]
        H = hessian(cols, spec["tokens"])
        W = torch.randn(8, cols)
        prepare_hessian(hessian(64, 256), torch.randn(8, 64), 0.01)  # warm-up: LAPACK's first call is slow
        prep, res["step"] = measure(lambda: prepare_hessian(H, W, 0.01))
        res["percdamp_used"] = prep.percdamp
    elif kind == "compensate":
        rows, cols = spec["rows"], spec["cols"]
        U = torch.randn(cols, cols).triu_().mul_(0.02 / math.sqrt(cols))  # (cols, cols): timing only
        U.diagonal().fill_(1.0)
        W = torch.randn(rows, cols) * 0.02
        times = OBCTimes()
        sign = lambda Wb, Ub, st: torch.sign(Wb) * Wb.abs().mean(dim=1, keepdim=True)  # noqa: E731
        Q, res["step"] = measure(lambda: obc_quantize(W.clone(), U, BS, sign, times))
        res["compensate_seconds"] = times.compensate
        res["sign_seconds"] = times.quantize
        t0 = time.perf_counter()
        hessian_error(W, Q, U)  # two (rows, cols) @ (cols, cols) products, like after every layer
        res["hessian_error_seconds"] = time.perf_counter() - t0
    elif kind in ("quantize", "validate"):
        rows, cols = spec["rows"], spec["cols"]
        cfg = BiLLMConfig.preset(spec["preset"]) if spec["preset"] != "default" else BiLLMConfig()
        H = hessian(cols, spec["tokens"])
        lin = nn.Linear(cols, rows, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0.0, 0.02)
        warm = nn.Linear(256, 64, bias=False)  # warm-up: a first call pays one-off initialisation
        quantize_linear(warm, hessian(256, 512), cfg, method_of(cfg), "warm-up", OBCTimes())
        times = OBCTimes()
        (packed, rep), res["step"] = measure(lambda: quantize_linear(lin, H, cfg, method_of(cfg), "layer", times))
        res["search_seconds"], res["compensate_seconds"] = times.quantize, times.compensate
        res["method_and_check_seconds"] = rep.seconds
        st = packed.stored()
        t0 = time.perf_counter()
        planes = billm_unpack(st.tensors, st.shape, st.meta)
        res["unpack_seconds"] = time.perf_counter() - t0
        scales = st.tensors["scales"].float()
        means = st.tensors["means"].float() if st.meta["centred"] else None
        t0 = time.perf_counter()
        billm_pack(*planes, scales, means, st.meta)
        res["pack_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        st.decode()
        res["decode_seconds"] = time.perf_counter() - t0
        res["hessian_rel_err"], res["weight_bits"], res["storage_bits"] = rep.hessian_rel_err, rep.weight_bits, rep.storage_bits
        res["salient_cols"] = rep.info.get("salient_cols")
    elif kind == "profile":
        from torch.profiler import ProfilerActivity, profile
        rows = spec["rows"]
        H = hessian(BS, 2048)
        W = torch.randn(rows, BS) * 0.02
        U = prepare_hessian(H, W, 0.01).U
        cfg = BiLLMConfig()
        billm_block(W.clone(), U, cfg)  # warm-up
        out = {}
        _, code, salient, _ = billm_block(W.clone(), U, BiLLMConfig.plus())
        salient = salient.tolist()
        for name, fn in (("search", lambda: billm_block(W.clone(), U, cfg)),
                         ("intra", lambda: intra_block_columns(W.clone(), U, code, 0, salient)), ("decode", None)):
            if name == "decode":
                lin = nn.Linear(BS, rows, bias=False)
                with torch.no_grad():
                    lin.weight.copy_(W)
                packed, _ = quantize_linear(lin, H, cfg, method_of(cfg), "layer", OBCTimes())
                st = packed.stored()
                fn = st.values
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
            leaves = [e for e in prof.events() if not e.cpu_children]
            out[name] = {"ops": len(leaves), "alloc_bytes": int(sum(max(0, e.cpu_memory_usage) for e in leaves))}
        res["profile"] = out
    else:
        raise ValueError(kind)
    res["torch_threads"] = torch.get_num_threads()
    return res


# ---------------------------------------------------------------------------------------------- parent side

def run_child(spec: dict, timeout: float) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       timeout=timeout)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not line:
        raise RuntimeError(f"{spec}: rc {p.returncode}\n{p.stderr[-2000:]}")
    res = json.loads(line[-1][len("RESULT "):])
    res["wall_seconds"] = time.time() - t0
    res["load_after"] = os.getloadavg()
    return res


def measure_all(a: argparse.Namespace) -> list[dict]:
    specs = []
    for c in sorted({c for _, c in shapes()}):
        specs.append(dict(kind="accumulate", cols=c, tokens=a.tokens))
    specs.append(dict(kind="accumulate", cols=4096, tokens=2 * a.tokens))  # linearity in tokens
    for c in (1024, 2048, 4096, 8192):
        specs.append(dict(kind="prepare", cols=c, tokens=2048))
    for r, c in shapes():
        specs.append(dict(kind="compensate", rows=min(r, a.comp_rows), cols=c, full_rows=r))
    sc = a.slice_blocks * BS
    for r in sorted({r for r, _ in shapes()}):
        specs.append(dict(kind="quantize", rows=r, cols=sc, preset="default", tokens=2048))
    for r, c in ((4096, sc), (4096, 2 * sc), (8192, sc)):
        specs.append(dict(kind="quantize", rows=r, cols=c, preset="plus", tokens=2048))
    for r, c in ((4096, 4096), (1024, 8192)):
        specs.append(dict(kind="validate", rows=r, cols=c, preset="default", tokens=2048))
    for r in (4096, 8192):
        specs.append(dict(kind="profile", rows=r))
    out = []
    for s in specs:
        try:
            res = run_child(s, a.timeout)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            res = {"spec": s, "error": str(e)[-1500:]}
        out.append(res)
        step = res.get("step", {})
        print(f"{json.dumps(s)}: {step.get('seconds', float('nan')):.2f} s, "
              f"peak +{step.get('peak_delta_bytes', 0) / 2**20:.0f} MiB, load {os.getloadavg()[0]:.1f}"
              + (f"  ERROR {res['error'][:200]}" if "error" in res else ""), flush=True)
    return out


# ---------------------------------------------------------------------------------------------- the model

def acc_flops(cols: int, tokens: int) -> float:
    """Multiply-adds x 2 of HessianAccumulator.add_batch: the tiles on and above the diagonal."""
    b = [min(TILE, cols - i) for i in range(0, cols, TILE)]
    return 2.0 * tokens * sum(b[i] * b[j] for i in range(len(b)) for j in range(i, len(b)))


def chol_flops(cols: int) -> float:
    """Cholesky (n^3/3) + cholesky_inverse (2n^3/3) + Cholesky (n^3/3)."""
    return 4.0 / 3.0 * cols**3


def comp_flops(rows: int, cols: int) -> float:
    """OBC error propagation: sum over blocks of 2 * rows * b * (cols after the block)."""
    return sum(2.0 * rows * min(BS, cols - s) * (cols - min(s + BS, cols)) for s in range(0, cols, BS))


def herr_flops(rows: int, cols: int) -> float:
    """hessian_error: (W - Q) @ H and W @ H."""
    return 4.0 * rows * cols**2


def refit_flops(rows: int, cols: int, slots: int = 4) -> float:
    """refit_scales (plus): the B @ H products in float64, 2 * slots * rows * cols^2."""
    return 2.0 * slots * rows * cols**2


def project(data: dict, slice_blocks: int, op_us: float = OP_US[0]) -> dict:
    """Per-layer and whole-model estimates from the measurements (CPU as measured, GPU from FLOPs)."""
    ms = [m for m in data["measurements"] if "error" not in m]
    def by(kind: str, **kw) -> list[dict]:
        return [m for m in ms if m["spec"]["kind"] == kind and all(m["spec"].get(k) == v for k, v in kw.items())]

    tokens_total = CALIB["nsamples"] * CALIB["seqlen"]

    acc = {m["spec"]["cols"]: m for m in by("accumulate", tokens=data["args"]["tokens"])}
    acc_rate = {c: acc_flops(c, m["spec"]["tokens"]) / m["step"]["seconds"] for c, m in acc.items()}
    prep = {m["spec"]["cols"]: m for m in by("prepare")}
    big = [c for c in prep if c >= 4096]
    a3 = sum(prep[c]["step"]["seconds"] * c**3 for c in big) / sum(c**6 for c in big)  # least squares t = a c^3
    kh = max(prep[c]["step"]["peak_delta_bytes"] / (4.0 * c * c) for c in big)  # H-sized float32 copies at the peak
    prep_s = lambda c: prep[c]["step"]["seconds"] if c in prep else a3 * c**3  # noqa: E731
    comp = {(m["spec"]["full_rows"], m["spec"]["cols"]): m for m in by("compensate")}
    sl = {(m["spec"]["rows"], m["spec"]["preset"], m["spec"]["cols"]): m for m in by("quantize")}
    sc = slice_blocks * BS

    def layer(r: int, c: int, preset: str = "default") -> dict:
        """Seconds of one quantize_linear call at (r, c) on this CPU, by part."""
        nb = math.ceil(c / BS)
        cm = comp[(r, c)]
        scale_r = r / cm["spec"]["rows"]
        d = sl[(r, "default", sc)]
        lin = r * c / (d["spec"]["rows"] * d["spec"]["cols"])
        parts = {
            "prepare": prep_s(c),
            "search": d["search_seconds"] / slice_blocks * nb,
            "compensate": cm["compensate_seconds"] * scale_r,
            "hessian_error": cm["hessian_error_seconds"] * scale_r,
            "pack": d["pack_seconds"] * lin,
            "decode": d["decode_seconds"] * lin,
        }
        if preset == "plus":
            p = sl.get((4096, "plus", sc)), sl.get((4096, "plus", 2 * sc))
            if None in p:
                return {}
            per_blk = {rr: sl[(rr, "plus", sc)]["search_seconds"] / slice_blocks for rr in (4096, 8192) if (rr, "plus", sc) in sl}
            ratio = sum(per_blk[rr] / (sl[(rr, "default", sc)]["search_seconds"] / slice_blocks) for rr in per_blk) / len(per_blk)
            parts["search"] *= ratio  # the intra-block column loop: measured plus/default ratio per block
            # refit: what grows from sc to 2*sc columns besides search and compensation is its rows*cols^2 part
            rest = [x["method_and_check_seconds"] - x["search_seconds"] - x["compensate_seconds"] for x in p]
            rate = (refit_flops(4096, 2 * sc) - refit_flops(4096, sc)) / max(rest[1] - rest[0], 1e-9)
            parts["refit"] = refit_flops(r, c) / rate
            parts["refit_fp64_gflops"] = rate / 1e9
        parts["total"] = sum(v for k, v in parts.items() if not k.endswith("gflops"))
        return parts

    prof = sorted((m["spec"]["rows"], m["profile"]) for m in by("profile"))

    def per_rows(key: str, what: str, r: int) -> float:
        """Profiled ops or bytes of one block at r rows: linear through the profiled row counts."""
        (r0, p0), (r1, p1) = prof[0], prof[-1]
        return p0[key][what] + (p1[key][what] - p0[key][what]) * (r - r0) / max(r1 - r0, 1)

    def gpu_layer(r: int, c: int, g: dict, preset: str = "default") -> dict:
        f32 = g["fp32"] * 1e12
        nb = math.ceil(c / BS)
        # operator calls x OP_US + bytes allocated, each written once and read twice, at EFF["bw"] of the bandwidth
        t_op = lambda key, rr, n_ops=1, n_bytes=1: (n_ops * per_rows(key, "ops", rr) * op_us * 1e-6  # noqa: E731
                                                   + 3 * n_bytes * per_rows(key, "alloc_bytes", rr) / (g["bw"] * 1e12 * EFF["bw"]))
        out = {
            "prepare": chol_flops(c) / (f32 * EFF["chol"]),
            "search": t_op("search", r, nb, nb),
            "compensate": comp_flops(r, c) / (f32 * EFF["gemm"]),
            "hessian_error": herr_flops(r, c) / (f32 * EFF["gemm"]),
            "pack": t_op("decode", r, 1, nb),  # assumed as dear as a decode
            "decode": t_op("decode", r, 1, nb),  # one call on the whole weight: the bytes of nb blocks
        }
        if preset == "plus" and "intra" in prof[0][1]:
            out["search"] += t_op("intra", r, nb, nb)
            K = 4 * nb  # refit_scales: scales per row, chunks of rows bounded by 256 MiB of float64 B @ H
            chunks = math.ceil(r / max(1, (256 * 2**20) // (8 * K * c)))
            out["refit"] = refit_flops(r, c) / (g["fp64"] * 1e12 * EFF["gemm"]) + chunks * (2 * nb + 4) * op_us * 1e-6
        out["total"] = sum(out.values())
        return out

    layers = {f"{r}x{c}": {"cpu_default": layer(r, c), "cpu_plus": layer(r, c, "plus"),
                           **{f"gpu_{g}": gpu_layer(r, c, spec) for g, spec in GPUS.items()},
                           **{f"gpu_plus_{g}": gpu_layer(r, c, spec, "plus") for g, spec in GPUS.items()}}
              for r, c in shapes()}

    # peak memory of one layer, an upper bound (the phases' peaks added): prepare's kh copies of H, KW float32
    # copies of W (quantize_linear's clone, the method's clone, Q), and the block search's workspace at r rows
    # (the whole peak of the r-row slice, which holds it)
    ws = {m["spec"]["rows"]: m["step"]["peak_delta_bytes"] for m in by("quantize", preset="default")}
    layer_peak = lambda r, c: kh * 4.0 * c * c + KW * 4.0 * r * c + ws[r]  # noqa: E731

    val = {}
    for m in by("validate"):
        r, c = m["spec"]["rows"], m["spec"]["cols"]
        mod = layer(r, c)
        val[f"{r}x{c}"] = {"measured_seconds": m["step"]["seconds"], "model_seconds": mod["total"],
                           "measured_search": m["search_seconds"], "model_search": mod["search"],
                           "measured_compensate": m["compensate_seconds"], "model_compensate": mod["compensate"],
                           "measured_peak_bytes": m["step"]["peak_delta_bytes"], "model_peak_bytes": layer_peak(r, c),
                           "hessian_rel_err": m["hessian_rel_err"]}

    models = {}
    for name, m in MODELS.items():
        lins = linears(m)
        groups = {"qkv": m["hidden"], "o": m["hidden"], "gateup": m["hidden"], "down": m["inter"]}
        nbatch = math.ceil(CALIB["nsamples"] / CALIB["batch"])
        acc_cpu = sum(acc_flops(c, tokens_total) / acc_rate[c] for c in groups.values())
        h, i = m["hidden"], m["inter"]
        one_per_hessian = list({g: (n, r, c, g) for n, r, c, g in lins}.values())  # linears fed one H share its factor

        def block_sum(key: str, part: str) -> float:
            return sum(layers[f"{r}x{c}"][key][part] for _, r, c, _ in (one_per_hessian if part == "prepare" else lins))

        blk = {"accumulate": acc_cpu}
        for part in ("prepare", "search", "compensate", "hessian_error", "pack", "decode"):
            blk[part] = block_sum("cpu_default", part)
        blk["propagate_decode"] = nbatch * blk["decode"]  # the packed block decodes each weight per batch
        cpu_blk = sum(blk.values())
        plus_extra = sum(layers[f"{r}x{c}"]["cpu_plus"].get("total", 0) - layers[f"{r}x{c}"]["cpu_default"]["total"]
                         for _, r, c, _ in lins)
        params = sum(r * c for _, r, c, _ in lins)
        fwd_flops = 2 * (2 * params * tokens_total + 2 * CALIB["nsamples"] * CALIB["seqlen"]**2 * m["hidden"])  # 2 passes, causal attn
        gpu = {}
        for g, gs in GPUS.items():
            gb = {"accumulate": sum(acc_flops(c, tokens_total) for c in groups.values()) / (gs["fp32"] * 1e12 * EFF["gemm"])}
            for part in ("prepare", "search", "compensate", "hessian_error", "pack", "decode"):
                gb[part] = block_sum(f"gpu_{g}", part)
            gb["propagate_decode"] = nbatch * gb["decode"]
            gb["forward_fp16"] = fwd_flops / (gs["fp16"] * 1e12 * EFF["gemm"])
            gb["host_transfers"] = 3 * CALIB["nsamples"] * CALIB["seqlen"] * h * 2 / H2D  # in twice, out once, fp16
            plus = sum(layers[f"{r}x{c}"][f"gpu_plus_{g}"]["total"] - layers[f"{r}x{c}"][f"gpu_{g}"]["total"]
                       for _, r, c, _ in lins)
            gpu[g] = {"per_block": gb, "block_seconds": sum(gb.values()), "run_hours": sum(gb.values()) * m["blocks"] / 3600,
                      "plus_extra_hours": plus * m["blocks"] / 3600}
        gib = 2**30
        mem = {
            "block_weights_fp16": 2 * params,
            "hessians_of_block_fp32": 4 * (3 * h * h + i * i),
            "largest_layer_workspace": max(layer_peak(r, c) + 4 * r * c for _, r, c, _ in lins),  # + the fp16->fp32 copy
            # one batch through the MLP: gate, up, act(gate)*up in fp16; the down Hessian's float32 and scaled copies
            "forward_batch": CALIB["batch"] * CALIB["seqlen"] * (3 * i * 2 + 2 * i * 4),
        }
        mem["total_gpu_bytes"] = sum(mem.values())
        mem["activations_host_bytes"] = 2 * CALIB["nsamples"] * CALIB["seqlen"] * h * 2  # inputs + outputs, fp16
        mem["total_gpu_gib"] = mem["total_gpu_bytes"] / gib
        mem["with_activations_on_gpu_gib"] = (mem["total_gpu_bytes"] + mem["activations_host_bytes"]) / gib
        models[name] = {"cpu_per_block": blk, "cpu_block_seconds": cpu_blk, "cpu_run_hours": cpu_blk * m["blocks"] / 3600,
                        "cpu_plus_extra_hours": plus_extra * m["blocks"] / 3600, "gpu": gpu, "memory": mem,
                        "forward_flops_per_block": fwd_flops}
    return {"accumulate_gflops": {c: r / 1e9 for c, r in acc_rate.items()},
            "prepare_fit_a": a3, "prepare_gflops": {c: chol_flops(c) / prep[c]["step"]["seconds"] / 1e9 for c in prep},
            "h_copies_at_peak": kh, "w_copies": KW, "search_workspace_bytes": ws, "layers": layers, "validation": val,
            "models": models,
            "assumptions": {"gpus": GPUS, "efficiency": EFF, "op_us": op_us, "h2d_bytes_per_s": H2D, "calibration": CALIB}}


def _commit() -> str:
    """This checkout's short commit."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens of the accumulate step")
    ap.add_argument("--slice-blocks", type=int, default=4, help="OBC blocks of 128 columns in each quantize slice")
    ap.add_argument("--comp-rows", type=int, default=1024, help="rows of the compensate step (scaled to the layer's)")
    ap.add_argument("--timeout", type=float, default=1500.0, help="seconds per measurement")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "scaling"))
    ap.add_argument("--reproject", metavar="JSON", help="recompute the projections of an earlier scaling.json")
    ap.add_argument("--remeasure", nargs="+", default=[], metavar="KIND",
                    choices=("accumulate", "prepare", "compensate", "quantize", "validate", "profile"),
                    help="with --reproject: measure these kinds again with this checkout (e.g. profile: the "
                         "operator counts behind the GPU estimates); the JSON records which, when and from what commit")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.remeasure and not a.reproject:
        ap.error("--remeasure needs --reproject JSON")
    if a.child:
        print("RESULT " + json.dumps(_child(json.loads(a.child))), flush=True)
        return 0
    if a.reproject:
        data = json.loads(Path(a.reproject).read_text())
        data["reprojected"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        if a.remeasure:
            data["measurements"] = [run_child(m["spec"], a.timeout) if m["spec"]["kind"] in a.remeasure else m
                                    for m in data["measurements"]]
            data.setdefault("remeasured", []).append({"kinds": a.remeasure, "commit": _commit(),
                                                      "date": data["reprojected"]})
    else:
        t0 = time.time()
        data = {"command": " ".join(["python", "benchmarks/bench_scaling.py"] + sys.argv[1:]), "commit": _commit(),
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "args": vars(a),
                "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()}}
        import torch
        data["machine"]["torch"] = torch.__version__
        data["measurements"] = measure_all(a)
        data["machine"]["load_after"] = os.getloadavg()
        data["seconds"] = time.time() - t0
    data["projection"] = project(data, data["args"]["slice_blocks"])
    slow = project(data, data["args"]["slice_blocks"], OP_US[1])["models"]
    keys = ("block_seconds", "run_hours", "plus_extra_hours")
    data["projection_slow_ops"] = {"op_us": OP_US[1], **{n: {g: {k: v[k] for k in keys} for g, v in m["gpu"].items()}
                                                         for n, m in slow.items()}}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
    p = data["projection"]
    print(f"{'layer':>12} {'prepare':>8} {'search':>8} {'comp':>8} {'herr':>8} {'pack':>8} {'decode':>8} {'total':>8}  (CPU s)")
    for k, v in p["layers"].items():
        d = v["cpu_default"]
        parts = ("prepare", "search", "compensate", "hessian_error", "pack", "decode", "total")
        print(f"{k:>12} " + " ".join(f"{d[x]:8.1f}" for x in parts))
    for name, m in p["models"].items():
        print(f"{name}: CPU {m['cpu_run_hours']:.1f} h; " + "; ".join(f"{g} {v['run_hours']:.2f} h" for g, v in m["gpu"].items())
              + f"; GPU peak {m['memory']['total_gpu_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
