"""Sweeps: ``billm compare`` / ``billm pareto`` as a list of independent, resumable jobs.

A job is one (method spec, calibration seed) of one model under one protocol (:class:`Sweep`). It
loads what it needs by name, so it runs anywhere the model and the output folder can be reached:
in this process (``--cluster local``), as a Ray task (``--cluster ray`` or ``ray://host:port``), or as
a plain ``billm`` command (``--print-commands``, for SLURM and the like). Each job works in its own
folder, ``OUT/jobs/<spec>-seed<seed>/``: its quantization records every finished block there and
its finished row is kept in ``row.json`` (see :func:`billm.compare.measure`), so a job whose worker
dies resumes after its last finished block, and a sweep run again reads the finished rows back.
"""

from __future__ import annotations

import functools
import logging
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .compare import Row, _slug, measure
from .errors import BillmError

log = logging.getLogger(__name__)

RAY_EXTRA = "ray is not installed: pip install 'billm[ray]' to run jobs on a Ray cluster"


@dataclass(frozen=True)
class Sweep:
    """The protocol every job of a sweep shares (plain values, so it travels to other processes)."""

    model: str
    out: str  # the output folder: jobs work in out/jobs
    tasks: tuple[str, ...]
    calib: str
    nsamples: int
    seqlen: int
    eval_seqlen: int
    max_windows: Optional[int] = None
    batch_size: int = 8
    dtype: str = "auto"
    device: Optional[str] = None
    data_dir: Optional[str] = None
    through_files: bool = False  # save each checkpoint, load it back, evaluate the loaded one (billm pareto)
    keep_checkpoints: Optional[str] = None  # where the checkpoints stay (default: a temporary folder)


@dataclass(frozen=True)
class Job:
    """One method spec under one calibration seed."""

    spec: str
    seed: int = 0

    @property
    def name(self) -> str:
        """The job's folder name (``billm:plus+b256``, seed 0 -> ``billm-plus+b256-seed0``)."""
        return f"{_slug(self.spec)}-seed{self.seed}"


def job_folder(sweep: Sweep, job: Job) -> Path:
    return Path(sweep.out) / "jobs" / job.name


@functools.lru_cache(maxsize=2)
def _model(name: str, dtype: str):
    """The model and tokenizer, loaded once per process (every job starts from a deep copy)."""
    import torch

    from .model.loading import checkpoint_dtype, load_model

    return load_model(name, dtype=checkpoint_dtype(name) if dtype == "auto" else getattr(torch, dtype))


def run_job(sweep: Sweep, job: Job, threads: Optional[int] = None) -> Row:
    """Measure one job (see :func:`billm.compare.measure`), loading the model and the data it needs.

    ``threads``: the CPU threads torch may use here (a Ray task gets its share of the node).
    """
    import torch

    from .data import get_calibration_batches, get_eval_tokens

    if threads is not None:
        torch.set_num_threads(threads)
    model, tok = _model(sweep.model, sweep.dtype)
    calib = get_calibration_batches(sweep.calib, tok, nsamples=sweep.nsamples, seqlen=sweep.seqlen, seed=job.seed,
                                    data_dir=sweep.data_dir)
    eval_ids = {t: get_eval_tokens(t, tok, sweep.eval_seqlen, data_dir=sweep.data_dir) for t in sweep.tasks}
    with tempfile.TemporaryDirectory(prefix="billm-job-") as tmp:
        checkpoint = None
        if sweep.through_files:
            checkpoint = Path(sweep.keep_checkpoints or tmp) / job.name
        return measure(model, tok, job.spec, calib, eval_ids, sweep.eval_seqlen, sweep.max_windows, sweep.device,
                       sweep.batch_size, checkpoint, job_folder(sweep, job), sweep.model, job.seed)


def run_jobs(sweep: Sweep, jobs: list[Job], cluster: str = "local", cpus_per_job: int = 1,
             max_retries: int = 3) -> list[Row]:
    """Every job's row, in the order of ``jobs``.

    ``cluster``: ``local`` (one after another in this process), ``ray`` (the Ray cluster this machine
    belongs to, or a new local one) or ``ray://host:port`` (a remote cluster's client address). On Ray
    each job is one task asking for one GPU when ``sweep.device`` is CUDA, else ``cpus_per_job`` CPUs;
    a task whose worker dies is retried up to ``max_retries`` times, and resumes from its folder.
    """
    from tqdm.auto import tqdm

    if cluster == "local":
        return [run_job(sweep, job) for job in tqdm(jobs, desc="jobs", unit="job")]
    if cluster != "ray" and not cluster.startswith("ray://"):
        raise BillmError(f"--cluster {cluster!r}: local, ray, or ray://host:port")
    try:
        import ray
    except ImportError:
        raise BillmError(RAY_EXTRA) from None
    if not ray.is_initialized():
        ray.init(address=None if cluster == "ray" else cluster, log_to_driver=False)
    gpu = sweep.device is not None and sweep.device.startswith("cuda")
    task = ray.remote(run_job).options(num_cpus=cpus_per_job, num_gpus=1 if gpu else 0, max_retries=max_retries)
    pending = {task.remote(sweep, job, cpus_per_job): i for i, job in enumerate(jobs)}
    rows: list[Optional[Row]] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc="jobs", unit="job") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                rows[pending.pop(ref)] = ray.get(ref)
                bar.update()
    return rows  # type: ignore[return-value]


def job_commands(argv: list[str], jobs: list[Job]) -> list[str]:
    """The sweep as plain shell commands: one per job (``--jobs-only``), then the one that gathers the table.

    ``argv``: the sweep's own command-line arguments (``compare MODEL ...`` or ``pareto MODEL ...``).
    The jobs may run anywhere that sees the output folder, in any order, at once; the last command
    reads their rows back (and measures any job that did not finish).
    """
    drop_valued = {"--methods", "--seed", "--seeds", "--cluster", "--cpus-per-job"}
    drop_flags = {"--print-commands", "--jobs-only"}
    base: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in drop_flags or (key in drop_valued and "=" in a):
            continue
        if key in drop_valued:
            skip = True
            continue
        base.append(a)
    specs = list(dict.fromkeys(j.spec for j in jobs))
    seeds = list(dict.fromkeys(j.seed for j in jobs))
    lines = [shlex.join(["billm", *base, "--methods", j.spec, "--seeds", str(j.seed), "--jobs-only"]) for j in jobs]
    lines.append(shlex.join(["billm", *base, "--methods", ",".join(specs), "--seeds", ",".join(map(str, seeds))]))
    return lines
