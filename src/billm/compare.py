"""Compare methods on one model: same starting weights, same calibration windows, same evaluation.

``billm compare MODEL --methods fp,rtn:w2,gptq:w2g128,pbllm,sign,billm`` writes ``compare.json``,
``compare.md`` (a row per method: weight bits, storage bits, perplexity per dataset, seconds) and
``pareto.png`` (perplexity, log scale, against storage bits).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import QuantConfig
from .methods.registry import config_from_spec

log = logging.getLogger(__name__)


def parse_method(spec: str) -> Optional[QuantConfig]:
    """``fp`` -> None (the full-precision model); any other spec -> its config (:func:`billm.config_from_spec`).

    Specs are ``method[:options]``, options joined by ``+``: a preset, ``field=value``, a boolean
    field (``refit``, ``nosba``), a fixed-choice value (``output``) or short forms run together
    (``gptq:w2g128a``, ``billm:plus+b256``, ``pbllm:f0.05``, ``billm:intra+refine3+fp8``).
    """
    if spec.strip() == "fp":
        return None
    return config_from_spec(spec)


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
    """Quantize a fresh copy of ``model`` with each method and evaluate it; ``model`` itself is left as it was.

    Storage bits come from the packed layers' bytes (:func:`billm.storage_bits`), as in ``billm inspect``.
    """
    from .eval import perplexity
    from .quantize import parse_devices, quantize

    configs = [(s, parse_method(s)) for s in specs]  # fail on a bad spec before any work
    eval_device = (parse_devices(device) or [None])[0]  # quantizing may spread over several; evaluating runs on one
    rows = []
    for spec, cfg in configs:
        work = model if cfg is None else copy.deepcopy(model)
        t0 = time.perf_counter()
        if cfg is None:
            wb = sb = 16.0
        else:
            rep = quantize(work, calibration, cfg, device=device, batch_size=batch_size)
            wb, sb = rep.weight_bits, rep.storage_bits
        row = Row(spec=spec, weight_bits=wb, storage_bits=sb, seconds=time.perf_counter() - t0)
        for task, ids in eval_ids.items():
            row.ppl[task] = perplexity(work, ids, seqlen=seqlen, max_windows=max_windows, device=eval_device).ppl
        log.info("%s: %s", spec, row)
        rows.append(row)
        del work
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
