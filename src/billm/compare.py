"""Compare methods on one model: same starting weights, same calibration windows, same evaluation.

``billm compare MODEL --methods fp,rtn:w2,gptq:w2g128,pbllm,sign,billm`` writes ``compare.json``,
``compare.md`` (a row per method: weight bits, storage bits, perplexity per dataset, seconds) and
``pareto.png`` (perplexity, log scale, against storage bits). ``billm pareto`` does the same with
every method's checkpoint written, loaded back (its logits checked equal) and evaluated, its
storage bits measured from the file, and the Pareto front marked.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

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
    """One method's figures (``from_file``: storage bits measured from its saved checkpoint, and the
    perplexities those of the checkpoint loaded back)."""

    spec: str
    weight_bits: float
    storage_bits: float
    seconds: float
    ppl: dict[str, float] = field(default_factory=dict)
    from_file: bool = False
    seed: int = 0  # the calibration sample's seed
    revision: str = ""  # the billm commit of the process that measured it, read as it started (resume.source_revision;
    # a row resumed after an interruption: the last process's, its row.json counts the blocks recorded earlier); "" unrecorded
    weights_sha256: str = ""  # SHA-256 of the checkpoint's tensors file (from_file rows; "" otherwise, or unrecorded): two
    # rows with the same digest evaluated the same bytes
    threads: int = 0  # torch's CPU threads in the measuring process (0: unrecorded): on the CPU they can change a
    # search's choices, so two rows of one spec at different thread counts need not hold the same bytes

    def label(self, rows: list["Row"]) -> str:
        """The spec, with the seed when ``rows`` hold several."""
        return self.spec if len({r.seed for r in rows}) == 1 else f"{self.spec} (seed {self.seed})"


def _slug(spec: str) -> str:
    """A folder name for a spec (``billm:plus+b256`` -> ``billm-plus+b256``)."""
    return "".join(c if c.isalnum() or c in "+-._=" else "-" for c in spec)


def through_file(model, tokenizer, folder: Path, probe: torch.Tensor):
    """Save the quantized ``model`` to ``folder``, load it back and check its logits on ``probe`` are equal.

    Returns (the loaded model, its storage bits measured from the file, its weight bits, the SHA-256 of its
    tensors file).

    Raises:
        QuantizationError: the loaded checkpoint computes other logits than the model it was saved from.
    """
    from .errors import QuantizationError
    from .packing.checkpoint import WEIGHTS, inspect, load, save

    save(model, folder, tokenizer)
    loaded = load(folder)
    with torch.inference_mode():
        a, b = model(probe).logits, loaded(probe).logits
    if not torch.equal(a, b):
        raise QuantizationError(f"{folder}: the saved checkpoint's logits differ from the quantized model's "
                                f"(max |diff| {float((a - b).abs().max()):.3g})")
    info = inspect(folder)
    with open(folder / WEIGHTS, "rb") as f:
        sha = hashlib.file_digest(f, "sha256").hexdigest()
    return loaded, info.storage_bits, info.weight_bits, sha


def model_digest(model) -> str:
    """A cheap identity of a model's weights: SHA-256 of its config and, per parameter, its name, shape,
    dtype and first and last 1024 values (a folder overwritten with other weights gets another digest)."""
    import json

    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        for part in (flat[:1024], flat[-1024:]):
            h.update(part.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def job_fingerprint(spec: str, model, model_name: str, calibration: torch.Tensor, eval_ids: dict[str, torch.Tensor],
                    seqlen: int, max_windows: Optional[int], batch_size: int, device, from_file: bool) -> dict[str, Any]:
    """What makes one method's row: a stored row (or recorded progress) is reused only when all of this is equal."""
    from .driver import parse_devices
    from .packing.checkpoint import tensor_sha256
    from .resume import software_versions

    digest = lambda t: f"{tensor_sha256(t)}:{tuple(t.shape)}:{t.dtype}"  # noqa: E731
    cfg = parse_method(spec)
    return {"spec": spec, "config": cfg.to_dict() if cfg is not None else None,  # a preset may be redefined
            "model": model_name, "model_sha256": model_digest(model),
            "dtype": str(next(model.parameters()).dtype),
            "device": ",".join(d.type for d in parse_devices(device)) or next(model.parameters()).device.type,
            "calibration_sha256": digest(calibration),
            "eval_sha256": {t: digest(ids) for t, ids in eval_ids.items()}, "eval_seqlen": seqlen,
            "max_windows": max_windows, "batch_size": batch_size, "from_file": from_file,
            **software_versions()}


def stored_row(folder: Path, fingerprint: dict[str, Any]) -> Optional[Row]:
    """The row a finished job left in ``folder`` (``row.json``), if it was made with this fingerprint."""
    import json

    path = Path(folder) / "row.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != fingerprint:
            log.warning("%s: made with another protocol, model or version; measuring again", path)
            return None
        return Row(**saved["row"])
    except (ValueError, TypeError, KeyError) as e:  # unreadable, or written by a billm with other row fields
        log.warning("%s: unreadable (%s); measuring again", path, e)
        return None


def _progress_store(folder: Path, fingerprint: dict[str, Any]):
    """The job's progress store; progress left by a run with another fingerprint is stale and discarded."""
    from .errors import BillmError
    from .resume import ProgressStore

    try:
        return ProgressStore(folder, fingerprint)
    except BillmError:
        log.warning("%s: progress of another protocol or version, discarded", folder)
        return ProgressStore(folder, fingerprint, restart=True)


def job_name(spec: str, seed: int = 0) -> str:
    """A job's folder name: the spec made file-safe, then the seed (``billm:plus+b256`` -> ``billm-plus+b256-seed0``)."""
    return f"{_slug(spec)}-seed{seed}"


def compare(model, tokenizer, specs: list[str], calibration: torch.Tensor, eval_ids: dict[str, torch.Tensor],
            seqlen: int, max_windows: Optional[int], device=None, batch_size: int = 8,
            checkpoints: Optional[Path] = None, store: Optional[Path] = None, model_name: str = "") -> list[Row]:
    """Quantize a fresh copy of ``model`` with each method and evaluate it; ``model`` itself is left as it was.

    Storage bits come from the packed layers' bytes (:func:`billm.storage_bits`), as in ``billm inspect``.
    With ``checkpoints`` each quantized model is saved in a folder there, loaded back (logits checked
    equal, see :func:`through_file`) and the loaded one evaluated; its storage bits are the file's.
    With ``store`` each method is a resumable job in its own folder there (see :func:`measure`).
    """
    for s in specs:
        parse_method(s)  # fail on a bad spec before any work
    return [measure(model, tokenizer, spec, calibration, eval_ids, seqlen=seqlen, max_windows=max_windows,
                    device=device, batch_size=batch_size,
                    checkpoint=Path(checkpoints) / job_name(spec) if checkpoints is not None else None,
                    job=Path(store) / job_name(spec) if store is not None else None, model_name=model_name)
            for spec in specs]


def measure(model, tokenizer, spec: str, calibration: torch.Tensor, eval_ids: dict[str, torch.Tensor], *,
            seqlen: int, max_windows: Optional[int], device=None, batch_size: int = 8,
            checkpoint: Optional[Path] = None, job: Optional[Path] = None, model_name: str = "",
            seed: int = 0, progress: bool = True, keep_checkpoint: bool = False) -> Row:
    """One method's row: quantize a copy of ``model`` with ``spec`` (``fp``: none), evaluate it.

    With ``checkpoint`` (a folder) the quantized model is saved there and loaded back (:func:`through_file`),
    and the loaded one is evaluated.

    With ``job`` (a folder) the work is resumable: the quantization records every finished block
    there (:class:`~billm.resume.ProgressStore`) and the finished row is kept in ``row.json`` with
    the protocol's fingerprint (:func:`job_fingerprint`). Measured again with the same protocol, the
    row is read back (unless its checkpoint is wanted and missing); an interrupted quantization
    continues after its last finished block.
    """
    from .eval import perplexity
    from .io import write_json_atomic
    from .driver import parse_devices, quantize
    from .resume import source_revision

    revision = source_revision()  # read before any work: the code this process runs
    cfg = parse_method(spec)
    eval_device = (parse_devices(device) or [None])[0]  # quantizing may spread over several; evaluating runs on one
    from_file = cfg is not None and checkpoint is not None
    fingerprint = job_fingerprint(spec, model, model_name, calibration, eval_ids, seqlen, max_windows, batch_size,
                                  device, from_file) if job is not None else None
    done = stored_row(job, fingerprint) if job is not None else None
    if done is not None and (not (from_file and keep_checkpoint) or Path(checkpoint).is_dir()):
        log.info("%s: finished earlier, read from %s", spec, job / "row.json")
        return done
    home = next(model.parameters()).device
    work = model if cfg is None else copy.deepcopy(model)
    resumed = 0
    if cfg is None:
        wb = sb = 16.0
        seconds = 0.0
    else:
        store = _progress_store(job / "progress", fingerprint) if job is not None else None
        rep = quantize(work, calibration, cfg, device=device, batch_size=batch_size, store=store, progress=progress)
        wb, sb, seconds, resumed = rep.weight_bits, rep.storage_bits, rep.seconds, rep.resumed_blocks
    sha = ""  # the evaluated checkpoint's tensors file, where there is one
    if from_file:
        work, sb, wb, sha = through_file(work, tokenizer, Path(checkpoint), calibration[:1, :64])
    row = Row(spec=spec, weight_bits=wb, storage_bits=sb, seconds=seconds, from_file=from_file, seed=seed,
              revision=revision, weights_sha256=sha, threads=torch.get_num_threads())
    for task, ids in eval_ids.items():
        row.ppl[task] = perplexity(work, ids, seqlen=seqlen, max_windows=max_windows, device=eval_device).ppl
    if cfg is None:
        model.to(home)  # evaluating may have moved it; every later job copies it from here
    log.info("%s: %s", spec, row)
    if job is not None:
        write_json_atomic(job / "row.json", {"fingerprint": fingerprint, "row": asdict(row),
                                             "resumed_blocks": resumed})  # blocks an interrupted run had finished
        if cfg is not None:
            store.clear()
    return row


def to_markdown(rows: list[Row], tasks: list[str]) -> str:
    """The comparison table in Markdown."""
    head = "| method | weight bits | storage bits | " + " | ".join(f"{t} ppl" for t in tasks) + " | seconds |"
    sep = "|---|---:|---:|" + "---:|" * len(tasks) + "---:|"
    lines = [head, sep]
    for r in rows:
        ppl = " | ".join(f"{r.ppl[t]:.2f}" for t in tasks)
        lines.append(f"| {r.label(rows)} | {r.weight_bits:.3f} | {r.storage_bits:.3f} | {ppl} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def revisions_line(rows: list[Row]) -> str:
    """Which billm commit measured which rows (a sweep resumed across commits mixes them): the most common one with
    its count, then each other one with its rows' labels; "" when no row recorded one."""
    by: dict[str, list[Row]] = {}
    for r in rows:
        by.setdefault(r.revision, []).append(r)
    if set(by) == {""}:
        return ""
    order = sorted(by, key=lambda rev: (-len(by[rev]), rev == "", rev))
    name = lambda rev: f"`{rev}`" if rev else "an unrecorded revision"  # noqa: E731
    parts = [f"{name(order[0])} ({len(by[order[0]])} of {len(rows)} rows)"]
    parts += [f"{name(rev)}: " + ", ".join(r.label(rows) for r in by[rev]) for rev in order[1:]]
    return "Measured by billm at " + "; ".join(parts) + ".\n"


def pareto_front(rows: list[Row], task: str) -> list[Row]:
    """The rows no other row beats on both storage bits and ``task`` perplexity (each at most, one strictly
    less), by increasing storage bits."""
    def beaten(r: Row) -> bool:
        return any(o.storage_bits <= r.storage_bits and o.ppl[task] <= r.ppl[task]
                   and (o.storage_bits, o.ppl[task]) != (r.storage_bits, r.ppl[task]) for o in rows)
    return sorted((r for r in rows if not beaten(r)), key=lambda r: r.storage_bits)


def pareto_markdown(rows: list[Row], tasks: Union[str, list[str]]) -> str:
    """The comparison table with a front column (on the first task), every task's perplexity, rows by increasing
    storage bits."""
    tasks = [tasks] if isinstance(tasks, str) else list(tasks)
    front = {id(r) for r in pareto_front(rows, tasks[0])}
    lines = ["| method | weight bits | storage bits | " + " | ".join(f"{t} ppl" for t in tasks) + " | front | seconds |",
             "|---|---:|---:|" + "---:|" * len(tasks) + ":---:|---:|"]
    for r in sorted(rows, key=lambda r: r.storage_bits):
        ppl = " | ".join(f"{r.ppl[t]:.2f}" for t in tasks)
        lines.append(f"| {r.label(rows)} | {r.weight_bits:.3f} | {r.storage_bits:.3f} | {ppl} | "
                     f"{'yes' if id(r) in front else ''} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[Row], task: str, path: Path, title: str, mark_front: bool = False) -> None:
    """Perplexity (log) against storage bits, one labelled point per method, written as PNG.

    With ``mark_front`` the Pareto front is drawn as a step line; a full-precision row (16 bits)
    is drawn as a horizontal reference line rather than a point, so the low-bit range stays readable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if not (mark_front and r.storage_bits >= 16)]
    many = len(points) > 10  # then the legend goes beside the axes, and points differ by marker as well as colour
    fig, ax = plt.subplots(figsize=(12, 6) if many else (8, 5) if mark_front else (7, 4.5))
    for r in rows:
        if mark_front and r.storage_bits >= 16:
            ax.axhline(r.ppl[task], color="gray", linestyle=":", label=f"{r.label(rows)} ({r.ppl[task]:.1f})")
    front_rows = pareto_front(points, task) if mark_front else []
    front = {id(r) for r in front_rows}
    colours, markers = plt.get_cmap("tab20").colors, "osD^vPX<>"
    for i, r in enumerate(points):
        ax.scatter(r.storage_bits, r.ppl[task], s=70 if id(r) in front else 40,
                   edgecolors="black" if id(r) in front else "none", color=colours[i % len(colours)],
                   marker=markers[i % len(markers)] if many else "o",
                   label=f"{r.label(rows)} ({r.storage_bits:.2f} b, {r.ppl[task]:.1f})")
    if front_rows:
        ax.step([r.storage_bits for r in front_rows], [r.ppl[task] for r in front_rows], where="post", color="black",
                linewidth=1, alpha=0.6, label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per quantized weight (scales, bitmaps included; log2)")
    ax.set_ylabel(f"{task} perplexity (log)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=7 if mark_front else 8, loc="best")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
