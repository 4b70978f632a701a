"""Peak memory of ``billm quantize`` against the model's size, per method and loading mode, step by step.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py [--layers 24 --hidden 1536 --intermediate 6144]
        [--runs rtn/lazy,gptq/lazy,billm/lazy,rtn/eager-fp16] [--out DIR]

Builds a synthetic LLaMA-architecture model of about 2 GB in fp16 (random weights, written one
block at a time as several safetensors shards, with a byte-level tokenizer), then quantizes it
with the CLI once per run, each in its own process, and reads that process's peak resident memory
(``VmHWM`` of ``/proc/self/status``; ``ru_maxrss`` where there is no ``/proc``, which also counts the
parent's resident size at the fork). Modes:

* ``lazy``: the default, an empty model whose blocks are read one at a time, in the model's fp16;
* ``eager-fp16``: ``--eager-load``, the whole model in memory in fp16;
* ``eager-fp32``: ``--eager-load --dtype float32`` (the whole model in float32).

Each run also samples its resident memory every 10 ms and charges it to the step running then
(reading a block, capture, Hessians, quantizing a block, reconstruction, propagation, saving; the
rest, loading and the progress records included, as one): the breakdown of where the peak is. A process that imports torch, transformers and billm
and does nothing else is measured too (the floor every run pays). The figures go to
``DIR/memory.json``, the tables to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import functools, json, os, resource, sys, threading, time
t0 = time.perf_counter()
rc = 0
phase, peaks = ["imports"], {}  # the step running now; the highest resident memory seen in each step


def sample():  # resident memory every 10 ms, charged to the step running then
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        while True:
            f.seek(0)
            rss = int(f.read().split()[1]) * page
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss)
            time.sleep(0.01)


def step(module, name, label):  # module.name, wrapped: the time inside it is charged to ``label``
    fn = getattr(module, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        outer, phase[0] = phase[0], label
        try:
            return fn(*a, **k)
        finally:
            phase[0] = outer
    setattr(module, name, wrapped)


if os.path.exists("/proc/self/statm"):
    threading.Thread(target=sample, daemon=True).start()
if sys.argv[1] != "--idle":
    import billm, billm.cli, billm.driver as d
    phase[0] = "outside the steps (loading, data, records, after saving)"
    for name, label in [("capture_inputs", "capture"), ("_fill_block", "read a block"),
                        ("_accumulate_hessians", "Hessians"), ("_quantize_block", "quantize a block"),
                        ("_reconstruct", "reconstruct"), ("_propagate", "propagate")]:
        step(d, name, label)
    step(billm.cli.billm, "save", "save")
    rc = billm.cli.main(sys.argv[2:])
else:
    import torch, transformers, billm  # noqa: F401  (the imports every run pays for)
time.sleep(0.05)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if os.path.exists("/proc/self/status"):  # this process's own high-water mark: ru_maxrss also keeps the parent's
    with open("/proc/self/status") as f:  # resident size at the fork that started this process
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": peak, "rc": rc,
                  "seconds": time.perf_counter() - t0, "peak_rss_bytes_by_step": peaks}))
"""


def byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer (one token per UTF-8 byte; ``<s>`` is 256), saved in ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", model_max_length=4096).save_pretrained(folder)


def _shard_key(name: str) -> str:
    """One shard per decoder block, one per tensor outside the blocks (state-dict order keeps each contiguous)."""
    parts = name.split(".")
    return f"block {parts[2]}" if name.startswith("model.layers.") else name


def synthetic_llama(folder: Path, layers: int, hidden: int, intermediate: int, vocab: int, seed: int = 0) -> int:
    """Write a random fp16 LLaMA to ``folder``, one shard at a time (never the whole model in memory); its bytes."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=hidden // 128, num_key_value_heads=hidden // 128, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="float16")
    with init_empty_weights():
        shapes = {n: tuple(p.shape) for n, p in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(_shard_key(name), []).append(name)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, names in enumerate(groups.values()):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        shard = {n: (torch.ones(shapes[n]) if n.endswith("norm.weight") else
                     torch.randn(shapes[n], generator=g) * shapes[n][-1] ** -0.5).to(torch.float16) for n in names}
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in names})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    cfg.save_pretrained(folder)
    byte_tokenizer(folder)
    return total


def spec_argv(spec: str) -> list[str]:
    """``billm quantize`` flags for a compare spec (``gptq:w2g128``): the method, then every option that differs
    from the method's default config, as the CLI derives its flags from the config's fields."""
    import dataclasses

    import billm

    cfg = billm.config_from_spec(spec)
    base = type(cfg)()
    argv = ["--method", cfg.method]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if not f.init or f.name == "method" or value == getattr(base, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (tuple, list)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def run_child(argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(argv)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(results: dict[str, dict], fp16_bytes: int) -> str:
    """Two tables: each run's peak against the fp16 model, and the peak of each step of the runs that traced them."""
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    lines = ["| run | peak RSS GiB | x fp16 model | seconds |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {gib(r['peak_rss_bytes'])} | {r['ratio_to_fp16_model']:.2f} | {r['seconds']:.0f} |"
              for name, r in results.items()]
    traced = {n: r["peak_rss_bytes_by_step"] for n, r in results.items() if n != "idle imports"
              and r.get("peak_rss_bytes_by_step")}
    if traced:
        steps = list(dict.fromkeys(s for t in traced.values() for s in t))
        lines += ["", "Peak resident memory during each step, GiB (x the fp16 model):", "",
                  "| step | " + " | ".join(traced) + " |", "|---|" + "---:|" * len(traced)]
        for step in steps:
            cells = [f"{gib(t[step])} ({t[step] / fp16_bytes:.2f})" if step in t else "" for t in traced.values()]
            lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=6144)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--runs", default="rtn/lazy,gptq/lazy,billm/lazy,rtn/eager-fp16",
                    help="METHOD/MODE pairs: METHOD a spec as compare takes it (rtn: the weights' path without a "
                         "method's workspace; gptq:w2g128), MODE lazy (block by block, the default), eager-fp16 (--eager-load) "
                         "or eager-fp32 (--eager-load --dtype float32)")
    ap.add_argument("--nsamples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--work", default=None, help="folder for the model and checkpoints (default: a temp folder)")
    ap.add_argument("--out", default="docs/results/memory")
    args = ap.parse_args()

    import shutil
    import tempfile

    work = Path(args.work or tempfile.mkdtemp(prefix="billm-mem-"))
    try:
        measure(args, work)
    finally:
        if not args.work:  # a temporary folder: its 2 GB model and checkpoints go with it
            shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    """Write (if absent) the synthetic model in ``work``, run every requested quantization, write the figures."""
    model_dir = work / "model"
    t0 = time.perf_counter()
    if not (model_dir / "config.json").is_file():
        synthetic_llama(model_dir, args.layers, args.hidden, args.intermediate, args.vocab)
    fp16_bytes = json.loads((model_dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    print(f"synthetic LLaMA: {args.layers} blocks, hidden {args.hidden}, intermediate {args.intermediate}, "
          f"vocab {args.vocab}: {fp16_bytes / 2**30:.2f} GiB in fp16 ({time.perf_counter() - t0:.0f} s to write)")
    activations = args.nsamples * args.seqlen * args.hidden * 2  # one copy of the block inputs, fp16
    flags = {"lazy": [], "eager-fp16": ["--eager-load"], "eager-fp32": ["--eager-load", "--dtype", "float32"]}
    runs = [tuple(r.split("/")) for r in args.runs.split(",")]
    bad = [r for r in runs if len(r) != 2 or r[1] not in flags]
    if bad:
        raise SystemExit(f"--runs: expected METHOD/MODE pairs with MODE one of {sorted(flags)}, got {bad}")
    results = {"idle imports": run_child(["--idle"])}
    for method, mode in runs:
        argv = ["quantize", str(model_dir), *spec_argv(method), "--calib", "pydoc", "--nsamples", str(args.nsamples),
                "--seqlen", str(args.seqlen), "--quiet", "--force", "--restart", "--out", str(work / f"q-{method}-{mode}")]
        results[f"{method} {mode}"] = run_child(["--run", *argv, *flags[mode]])
        print(f"{method} {mode}: {results[f'{method} {mode}']['peak_rss_bytes'] / 2**30:.2f} GiB peak", flush=True)
    for r in results.values():
        r["ratio_to_fp16_model"] = r["peak_rss_bytes"] / fp16_bytes
    print(markdown(results, fp16_bytes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {"model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                     "vocab": args.vocab, "fp16_bytes": fp16_bytes},
           "nsamples": args.nsamples, "seqlen": args.seqlen,
           "activation_bytes": activations, "runs": results, "threads": os.cpu_count()}
    (out / "memory.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"written {out / 'memory.json'}")


if __name__ == "__main__":
    main()
