"""Vectorised BiLLM searches against the loop oracle, on real SmolLM2 block-0 linears.

For every 128-column block met while BiLLM-quantizing a linear (real weights, real Hessian), both
searches (salient column count, break point) run twice on the same matrix: vectorised
(``billm.methods.search``) and as the plain loop (``tests/oracle.py``). The choices must be
identical; the times are summed and printed as a ratio measured in the same run.

    python benchmarks/bench_search.py [--data-dir ../shared/data] [--threads 2]

Linears: ``mlp.up_proj`` (1536x576) and ``mlp.down_proj`` (576x1536) of block 0, Hessians from
16 C4 windows of 512 tokens (the down_proj Hessian is the one stored in
``reference/billm_reference_block0.safetensors``), and ``self_attn.q_proj`` as a bonus.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from billm import BiLLMConfig
from billm.methods.billm import encode_groups, salience
from billm.methods.obc import obc_quantize, prepare_hessian
from billm.methods.search import break_candidates, search_break_point, search_salient_columns, split_masks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import break_search_loop, salient_search_loop  # noqa: E402  (the tests' plain-loop oracle)


def block0_hessians(data_dir: Path, nsamples: int, seqlen: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(weight, Hessian) of SmolLM2 block 0 linears from real C4 calibration windows."""
    from billm.data import get_calibration_batches
    from billm.methods.obc import HessianAccumulator
    from billm.model.loading import load_model
    from billm.model.walker import capture_inputs, find_blocks, find_linears, get_weight, run_block

    model, tok = load_model(None)
    ids = get_calibration_batches("c4", tok, nsamples=nsamples, seqlen=seqlen, seed=0, data_dir=str(data_dir))
    inputs = capture_inputs(model, list(ids.split(8)))
    block = find_blocks(model)[1][0]
    lin = find_linears(block)
    wanted = ["mlp.up_proj", "mlp.down_proj", "self_attn.q_proj"]
    accs = {n: HessianAccumulator(get_weight(lin[n]).shape[1]) for n in wanted}
    hooks = [lin[n].register_forward_hook(lambda m, i, o, a=accs[n]: a.add_batch(i[0])) for n in wanted]
    run_block(block, inputs, "cpu")
    for h in hooks:
        h.remove()
    return {n: (get_weight(lin[n]).float().clone(), accs[n].H) for n in wanted}


def compare_on_linear(W: torch.Tensor, H: torch.Tensor, cfg: BiLLMConfig) -> dict:
    """Walk the OBC blocks of one linear; time both search implementations on each block."""
    t = {"vec_salient": 0.0, "loop_salient": 0.0, "vec_break": 0.0, "loop_break": 0.0}
    agree = [0, 0]
    W = W.clone()
    prep = prepare_hessian(H, W, cfg.percdamp)

    def block(Wb, Ub, start):
        S = salience(Wb, Ub, cfg.salient_metric)
        M = S if cfg.search_domain.value == "salience" else Wb
        score = S.sum(0)
        t0 = time.perf_counter()
        fast = search_salient_columns(M, score, cfg.min_salient_cols, cfg.max_salient_cols, cfg.salient_search_order, cfg.centred)
        t1 = time.perf_counter()
        k, _ = salient_search_loop(M, score, cfg.min_salient_cols, cfg.max_salient_cols, cfg.salient_search_order, cfg.centred)
        t2 = time.perf_counter()
        smask = fast.mask(Wb.shape[1])
        cands = break_candidates(M, smask, cfg.break_grid.value, cfg.n_break_candidates)
        t3 = time.perf_counter()
        brk = search_break_point(M, smask, cands, 1, cfg.centred)
        t4 = time.perf_counter()
        idx, _ = break_search_loop(M, smask, cands, 1, cfg.centred)
        t5 = time.perf_counter()
        t["vec_salient"] += t1 - t0
        t["loop_salient"] += t2 - t1
        t["vec_break"] += t4 - t3
        t["loop_break"] += t5 - t4
        agree[0] += 1
        agree[1] += int(k == fast.k and idx == brk.index)
        return encode_groups(Wb, *split_masks(M, smask, brk.value), cfg).decode()

    obc_quantize(W, prep.U, cfg.blocksize, block)
    return {**t, "blocks": agree[0], "same_choices": agree[1]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--preset", default="reference", choices=["default", *BiLLMConfig.presets])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BiLLMConfig.preset(args.preset)
    print(f"$ python {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {args.threads} threads, preset {args.preset}")
    layers = block0_hessians(Path(args.data_dir), args.nsamples, args.seqlen)
    tot = {"vec": 0.0, "loop": 0.0}
    print(f"{'linear':18} {'shape':>10} {'blocks':>6} {'same':>5} {'salient vec/loop (s)':>22} {'x':>6} "
          f"{'break vec/loop (s)':>20} {'x':>6}")
    for name, (W, H) in layers.items():
        r = compare_on_linear(W, H, cfg)
        tot["vec"] += r["vec_salient"] + r["vec_break"]
        tot["loop"] += r["loop_salient"] + r["loop_break"]
        print(f"{name:18} {W.shape[0]:>4}x{W.shape[1]:<5} {r['blocks']:>6} {r['same_choices']:>5} "
              f"{r['vec_salient']:>10.3f}/{r['loop_salient']:<10.3f} {r['loop_salient'] / r['vec_salient']:>6.1f} "
              f"{r['vec_break']:>9.3f}/{r['loop_break']:<9.3f} {r['loop_break'] / r['vec_break']:>6.1f}")
        if r["same_choices"] != r["blocks"]:
            print(f"  MISMATCH: {r['blocks'] - r['same_choices']} blocks chose differently")
    print(f"both searches, all blocks: vectorised {tot['vec']:.3f}s, loop {tot['loop']:.3f}s, "
          f"speed-up x{tot['loop'] / tot['vec']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
