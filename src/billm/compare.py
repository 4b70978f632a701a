"""Compare methods on one model: same starting weights, same calibration windows, same evaluation.

``billm compare MODEL --methods fp,rtn:w2,gptq:w2g128,pbllm,sign,billm`` writes ``compare.json``,
``compare.md`` (a row per method: weight bits, storage bits, perplexity per dataset, seconds) and
``pareto.png`` (perplexity, log scale, against storage bits).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import BiLLMConfig, GPTQConfig, PBLLMConfig, QuantConfig, RTNConfig, SignConfig, SliMConfig
from .errors import BillmError

log = logging.getLogger(__name__)


def parse_method(spec: str) -> Optional[QuantConfig]:
    """``fp`` -> None; ``rtn:w2``, ``gptq:w3g128``, ``gptq:w2g128a`` (act-order), ``sign``,
    ``sign:noobc``, ``slim:w2`` (SliM-LLM, average 2 bits, groups of 128; ``slim:w3g64``,
    ``+nosba`` / ``+nosqc`` switch its parts off, ``+output`` / ``+diag`` pick SBA's error proxy), ``pbllm``, ``pbllm:f0.05``, ``billm``, ``billm:reference`` -> a config.

    BiLLM options join with ``+``: a preset (``paper``, ``reference``, ``plus``) and/or ``intra``
    (in-block GPTQ), ``refineN`` (N refinement rounds), ``refit``, ``centred``, ``bN`` (blocksize),
    ``fp8`` (scales and means in fp8 e4m3),
    e.g. ``billm:intra+refit`` or ``billm:plus+b256``."""
    name, _, opts = spec.strip().partition(":")
    if name == "fp":
        return None
    if name in ("rtn", "gptq"):
        m = re.fullmatch(r"w(\d)(?:g(\d+))?(a?)", opts or "w4")
        if not m:
            raise BillmError(f"bad method spec {spec!r}: expected {name}:w<bits>[g<groupsize>]")
        kw: dict[str, Any] = {"bits": int(m.group(1)), "groupsize": int(m.group(2)) if m.group(2) else -1}
        if name == "gptq":
            return GPTQConfig(**kw, act_order=bool(m.group(3)))
        return RTNConfig(**kw)
    if name == "slim":
        return _slim_spec(spec, opts)
    if name == "sign":
        return SignConfig(obc=opts != "noobc")
    if name == "pbllm":
        return PBLLMConfig(salient_fraction=float(opts[1:])) if opts.startswith("f") else PBLLMConfig()
    if name == "billm":
        return _billm_spec(spec, opts)
    raise BillmError(f"unknown method spec {spec!r}; use fp, rtn:wN[gG], gptq:wN[gG][a], slim:wN[gG], sign, pbllm, billm")


def _slim_spec(spec: str, opts: str) -> SliMConfig:
    width, *flags = opts.split("+") if opts else ["w2"]
    m = re.fullmatch(r"w(\d)(?:g(\d+))?", width)
    if not m or not set(flags) <= {"nosba", "nosqc", "diag", "output"}:
        raise BillmError(f"bad method spec {spec!r}: expected slim:w<bits>[g<groupsize>][+nosba][+nosqc][+diag|+output]")
    kw: dict[str, Any] = {"bits": int(m.group(1)), "sba": "nosba" not in flags, "sqc": "nosqc" not in flags}
    for proxy in ("diag", "output"):
        if proxy in flags:
            kw["sba_error"] = proxy
    if m.group(2):
        kw["groupsize"] = int(m.group(2))
    return SliMConfig(**kw)


def _billm_spec(spec: str, opts: str) -> BiLLMConfig:
    presets = {"paper": BiLLMConfig.paper, "reference": BiLLMConfig.reference, "plus": BiLLMConfig.plus}
    base, kw = BiLLMConfig, {}
    for tok in [t for t in opts.split("+") if t]:
        if tok in presets:
            base = presets[tok]
        elif tok == "intra":
            kw["intra_block"] = True
        elif tok == "refit":
            kw["refit"] = True
        elif tok == "centred":
            kw["centred"] = True
        elif re.fullmatch(r"refine\d+", tok):
            kw["refine_rounds"] = int(tok[6:])
        elif re.fullmatch(r"b\d+", tok):
            kw["blocksize"] = int(tok[1:])
        elif tok == "fp8":
            kw["scale_dtype"] = "float8_e4m3fn"
        else:
            raise BillmError(f"bad method spec {spec!r}: unknown billm option {tok!r} (use paper, reference, plus, "
                             "intra, refineN, refit, centred, bN, fp8 joined by '+')")
    return base(**kw)


@dataclass
class Row:
    """One method's figures."""

    spec: str
    weight_bits: float
    storage_bits: float
    seconds: float
    ppl: dict[str, float] = field(default_factory=dict)


def compare(model, tokenizer, specs: list[str], calibration: torch.Tensor, eval_ids: dict[str, torch.Tensor],
            seqlen: int, max_windows: Optional[int], device=None, batch_size: int = 8) -> list[Row]:
    """Quantize a fresh copy of the starting weights with each method and evaluate it."""
    import billm
    from .eval import perplexity

    configs = [(s, parse_method(s)) for s in specs]  # fail on a bad spec before any work
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rows = []
    for spec, cfg in configs:
        model.load_state_dict(start)
        t0 = time.perf_counter()
        if cfg is None:
            wb = sb = 16.0
        else:
            rep = billm.quantize(model, calibration, cfg, device=device, batch_size=batch_size)
            wb, sb = rep.weight_bits, rep.storage_bits
        row = Row(spec=spec, weight_bits=wb, storage_bits=sb, seconds=time.perf_counter() - t0)
        for task, ids in eval_ids.items():
            row.ppl[task] = perplexity(model, ids, seqlen=seqlen, max_windows=max_windows, device=device).ppl
        log.info("%s: %s", spec, row)
        rows.append(row)
    model.load_state_dict(start)
    return rows


def to_markdown(rows: list[Row], tasks: list[str]) -> str:
    """The comparison table in Markdown."""
    head = "| method | weight bits | storage bits | " + " | ".join(f"{t} ppl" for t in tasks) + " | seconds |"
    sep = "|---|---:|---:|" + "---:|" * len(tasks) + "---:|"
    lines = [head, sep]
    for r in rows:
        ppl = " | ".join(f"{r.ppl[t]:.2f}" for t in tasks)
        lines.append(f"| {r.spec} | {r.weight_bits:.3f} | {r.storage_bits:.3f} | {ppl} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[Row], task: str, path: Path, title: str) -> None:
    """Perplexity (log) against storage bits, one labelled point per method, written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r.storage_bits, r.ppl[task], s=60, label=f"{r.spec} ({r.storage_bits:.2f} b, {r.ppl[task]:.1f})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per quantized weight (scales, bitmaps included; log2)")
    ax.set_ylabel(f"{task} perplexity (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
