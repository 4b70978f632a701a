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
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .compare import Row, job_name, measure
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
        return job_name(self.spec, self.seed)


def job_folder(sweep: Sweep, job: Job) -> Path:
    """Where ``job`` works: its progress store and, once finished, its ``row.json``."""
    return Path(sweep.out) / "jobs" / job.name


@functools.lru_cache(maxsize=1)
def _model(name: str, dtype: str):
    """The model and tokenizer, loaded once per process for the jobs it runs (each starts from a deep copy)."""
    import torch

    from .model.loading import checkpoint_dtype, load_model

    return load_model(name, dtype=checkpoint_dtype(name) if dtype == "auto" else getattr(torch, dtype))


def job_inputs(sweep: Sweep, seed: int):
    """What a job of ``sweep`` under calibration ``seed`` measures on: (model, tokenizer, calibration ids (n, seqlen),
    evaluation ids per task), the same that make its fingerprint (:func:`billm.compare.job_fingerprint`)."""
    from .data import get_calibration_batches, get_eval_tokens

    model, tok = _model(sweep.model, sweep.dtype)
    calib = get_calibration_batches(sweep.calib, tok, nsamples=sweep.nsamples, seqlen=sweep.seqlen, seed=seed,
                                    data_dir=sweep.data_dir)
    eval_ids = {t: get_eval_tokens(t, tok, sweep.eval_seqlen, data_dir=sweep.data_dir) for t in sweep.tasks}
    return model, tok, calib, eval_ids


def run_job(sweep: Sweep, job: Job, threads: Optional[int] = None, progress: bool = True) -> Row:
    """Measure one job (see :func:`billm.compare.measure`), loading the model and the data it needs.

    ``threads``: the CPU threads torch may use here (a Ray task gets its share of the node).
    """
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    model, tok, calib, eval_ids = job_inputs(sweep, job.seed)
    with tempfile.TemporaryDirectory(prefix="billm-job-") as tmp:
        checkpoint = Path(sweep.keep_checkpoints or tmp) / job.name if sweep.through_files else None
        return measure(model, tok, job.spec, calib, eval_ids, seqlen=sweep.eval_seqlen, max_windows=sweep.max_windows,
                       device=sweep.device, batch_size=sweep.batch_size, checkpoint=checkpoint,
                       job=job_folder(sweep, job), model_name=sweep.model, seed=job.seed, progress=progress,
                       keep_checkpoint=sweep.keep_checkpoints is not None)


def check_cluster(cluster: str, device: Optional[str]) -> None:
    """Refuse a ``--cluster`` value, or a device a Ray task cannot have, before any work."""
    if cluster == "local":
        return
    if cluster != "ray" and not cluster.startswith("ray://"):
        raise BillmError(f"--cluster {cluster!r}: local, ray, or ray://host:port")
    if device is not None and (device.count(",") or ":" in device):
        raise BillmError(f"--device {device!r} with --cluster {cluster}: each Ray job gets one device, "
                         "chosen by Ray: pass --device cuda (or cpu)")


def ray_task_options(sweep: Sweep, cpus_per_job: int, max_retries: int) -> dict:
    """What each job's Ray task asks for: ``cpus_per_job`` CPUs, one GPU for a CUDA sweep (then a fresh
    worker per task, ``max_calls=1``: CUDA, once started in a process, keeps the device it first saw),
    and retries when its worker dies."""
    gpu = sweep.device is not None and sweep.device.startswith("cuda")
    return {"num_cpus": cpus_per_job, "num_gpus": 1 if gpu else 0, "max_retries": max_retries,
            "max_calls": 1 if gpu else 0}


def _remove(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def run_jobs(sweep: Sweep, jobs: list[Job], cluster: str = "local", cpus_per_job: int = 1, max_retries: int = 3,
             restart: bool = False) -> list[Row]:
    """Every job's row, in the order of ``jobs``.

    ``cluster``: ``local`` (one after another in this process), ``ray`` (the Ray cluster this machine
    belongs to, or a new local one) or ``ray://host:port`` (a remote cluster's client address). On Ray
    each job is one task asking for one GPU when ``sweep.device`` is CUDA and ``cpus_per_job`` CPUs;
    a task whose worker dies is retried up to ``max_retries`` times, and resumes from its folder. A
    job that fails otherwise does not stop the others: once all have ended, one error names the
    failed jobs (the finished rows are kept, so the same command measures only those again).
    ``restart``: remove every job's folder first (on the cluster, by a task, when there is one).

    Raises:
        BillmError: a bad ``cluster``, Ray missing, or jobs that failed.
    """
    from tqdm.auto import tqdm

    check_cluster(cluster, sweep.device)
    jobs_dir = str(Path(sweep.out) / "jobs")
    if cluster == "local":
        if restart:
            _remove(jobs_dir)
        try:
            return [run_job(sweep, job) for job in tqdm(jobs, desc="jobs", unit="job")]
        finally:
            _model.cache_clear()
    try:
        import ray
    except ImportError:
        raise BillmError(RAY_EXTRA) from None
    if not ray.is_initialized():
        ray.init(address=None if cluster == "ray" else cluster, log_to_driver=False)
    if restart:
        ray.get(ray.remote(num_cpus=0)(_remove).remote(jobs_dir))
    task = ray.remote(**ray_task_options(sweep, cpus_per_job, max_retries))(run_job)
    pending = {task.remote(sweep, job, cpus_per_job, False): i for i, job in enumerate(jobs)}
    rows: list[Optional[Row]] = [None] * len(jobs)
    failed: list[str] = []
    with tqdm(total=len(jobs), desc="jobs", unit="job") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                try:
                    rows[i] = ray.get(ref)
                except ray.exceptions.RayError as e:
                    failed.append(f"{jobs[i].name}: {str(e).strip().splitlines()[-1]}")
                bar.update()
    if failed:
        raise BillmError(f"{len(failed)} of {len(jobs)} job(s) failed (their logs: Ray's session logs); the rest "
                         f"are kept in {jobs_dir}:\n  " + "\n  ".join(failed))
    return rows  # type: ignore[return-value]


def job_commands(sweep: Sweep, jobs: list[Job], command: str) -> list[str]:
    """The sweep as plain shell commands: one per job (``--jobs-only``), then the one that gathers the table.

    ``command``: ``compare`` or ``pareto``. Every protocol option is spelled out from ``sweep``
    (paths absolute), so the jobs may run anywhere that sees the model and the output folder, in
    any order, at once; the last command reads their rows back (and measures any job that did not finish).
    """
    opts = ["--tasks", ",".join(sweep.tasks), "--calib", sweep.calib, "--nsamples", str(sweep.nsamples),
            "--seqlen", str(sweep.seqlen), "--eval-seqlen", str(sweep.eval_seqlen), "--batch-size", str(sweep.batch_size),
            "--dtype", sweep.dtype, "--out", sweep.out]
    for flag, value in (("--max-windows", sweep.max_windows), ("--device", sweep.device),
                        ("--data-dir", sweep.data_dir), ("--keep-checkpoints", sweep.keep_checkpoints)):
        if value is not None:
            opts += [flag, str(value)]
    specs = list(dict.fromkeys(j.spec for j in jobs))
    seeds = list(dict.fromkeys(j.seed for j in jobs))
    base = ["billm", command, sweep.model, *opts]
    lines = [shlex.join([*base, "--methods", j.spec, "--seeds", str(j.seed), "--jobs-only"]) for j in jobs]
    lines.append(shlex.join([*base, "--methods", ",".join(specs), "--seeds", ",".join(map(str, seeds))]))
    return lines
