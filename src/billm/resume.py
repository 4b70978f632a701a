"""Resumable quantization: record each finished block, continue after a crash from the last one.

A :class:`ProgressStore` lives in a folder beside the output (``.<out>.billm-progress``)::

    run.json                 the run's fingerprint (model, config, calibration digest, versions)
    block-0003.safetensors   block 3's packed weights; its layer reports in the header metadata
    hidden.safetensors       the calibration activations after the last block they were saved for
                             (``after_block`` in its metadata): the next block's inputs; saved every
                             ``every`` blocks (``--checkpoint-every``), since for a large model they
                             weigh gigabytes; a resumed run redoes the blocks after them

Every file is written to a temporary name, fsynced and renamed, in the order block file, then
activations, so after a kill at any moment the activations name the last block whose outputs
are known, and every block up to it has its file. A resumed run replays those blocks' weights
(swaps their PackedLinear layers back in) and continues with the next block on
the saved activations: the final checkpoint is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from torch import Tensor

from .errors import BillmError
from .io import write_atomic, write_json_atomic
from .packing.formats import StoredWeight

log = logging.getLogger(__name__)

FAULT_ENV = "BILLM_FAULT_INJECT"  # tests: "stage:block" kills the process with SIGKILL there
FAULT_FILE_ENV = "BILLM_FAULT_FILE"  # tests: a file holding "stage:block"; the first process to get there kills itself


def fault_point(stage: str, block: int) -> None:
    """Die with SIGKILL at ``stage`` of ``block`` when a fault-injection test asks for it.

    ``$BILLM_FAULT_INJECT`` asks every process; ``$BILLM_FAULT_FILE`` names a file whose text asks
    once: the first process to get there claims the file (renames it away) and dies, and the one
    that retries the work runs through (what a worker lost on a cluster does).
    """
    here = f"{stage}:{block}"
    if os.environ.get(FAULT_ENV) == here:
        os.kill(os.getpid(), signal.SIGKILL)
    path = os.environ.get(FAULT_FILE_ENV)
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                wanted = f.read().strip()
        except OSError:
            return
        if wanted == here:
            try:
                os.rename(path, f"{path}.fired")  # only one process wins the rename
            except OSError:
                return
            os.kill(os.getpid(), signal.SIGKILL)


def software_versions() -> dict[str, str]:
    """The billm and torch versions a result was made with (part of every fingerprint)."""
    import torch

    from . import __version__

    return {"billm": __version__, "torch": torch.__version__}


def _stream_tensors(hidden: list[Tensor], prefix: str = "") -> dict[str, Tensor]:
    """An activation stream as a file's tensors, one per calibration batch: ``0``, ``1``, ... for the quantized
    model's, ``fp0``, ``fp1``, ... (``prefix`` ``fp``) for the full-precision one."""
    return {f"{prefix}{b}": h.detach().cpu().contiguous() for b, h in enumerate(hidden)}


def _read_stream(f: Any, prefix: str = "") -> list[Tensor]:
    """A stream from an open safetensors file (:func:`_stream_tensors`; ``batches`` in its metadata)."""
    return [f.get_tensor(f"{prefix}{b}") for b in range(int(f.metadata()["batches"]))]


@functools.lru_cache(maxsize=1)
def source_revision() -> str:
    """The git commit billm's own source is checked out at (``abc1234``; ``abc1234-dirty`` when its files differ
    from it), or "" where billm is not a file of a git checkout (an installed wheel). Recorded beside a result so a
    table can say which code measured each row; never part of a fingerprint (a resumed sweep may span commits)."""
    import subprocess

    src = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=30)

    try:
        if git("ls-files", "--error-unmatch", "__init__.py").returncode != 0:  # not billm's own repository
            return ""
        head = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain", "--", ".")  # modified, staged or new files of the package
    except (OSError, subprocess.SubprocessError):
        return ""
    if head.returncode != 0 or status.returncode != 0:
        return ""
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def quantize_fingerprint(model_name: str, model_config: dict[str, Any], config: dict[str, Any],
                         calibration: dict[str, Any], calibration_ids: Tensor, batch_size: int,
                         dtype: Any) -> dict[str, Any]:
    """What a ``billm quantize`` run's progress is valid for: recorded progress is resumed only when all is equal.

    Args:
        model_name: the model as named on the command line.
        model_config: ``model.config.to_dict()``.
        config: the method's config record (``QuantConfig.to_dict()``).
        calibration: source, nsamples, seqlen and seed of the calibration windows.
        calibration_ids: the (n, seqlen) calibration token ids themselves (digested).
        batch_size: calibration sequences per forward.
        dtype: the dtype the model runs in.
    """
    from .packing.checkpoint import tensor_sha256

    return {"model": model_name, "model_config": model_config, "config": config,
            "calibration": {**calibration, "sha256": tensor_sha256(calibration_ids)}, "batch_size": batch_size,
            "dtype": str(dtype), **software_versions()}


def progress_dir(out: Path) -> Path:
    """The progress folder of output folder ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}.billm-progress"


@dataclass
class ResumeState:
    """What a previous, interrupted run finished.

    Attributes:
        next_block: the first block still to quantize.
        layers: the finished blocks' layer reports (as dicts), in order.
        stored: the finished layers' packed weights, by full name.
        hidden: the next block's inputs, per calibration batch (None when every block is done).
        phases: the phase timings spent so far.
        fp_hidden: the full-precision stream at the same point (after the last block too; None when not kept).
    """

    next_block: int
    layers: list[dict[str, Any]]
    stored: dict[str, StoredWeight]
    hidden: Optional[list[Tensor]]
    phases: dict[str, float]
    fp_hidden: Optional[list[Tensor]] = None


def _save_atomic(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str], stage: str, block: int) -> None:
    from safetensors.torch import save_file

    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                 before_rename=lambda: fault_point(f"mid-{stage}", block))  # written but not yet renamed


class ProgressStore:
    """Per-block progress of one quantization run (see module docstring).

    Args:
        folder: the progress folder.
        fingerprint: JSON-able identity of the run; progress of a different run is refused.
        restart: discard any previous progress first.
        every: save the activations after every ``every``-th block only (the packed blocks: always).
    """

    def __init__(self, folder: Path, fingerprint: dict[str, Any], restart: bool = False, every: int = 1) -> None:
        if every < 1:
            raise BillmError(f"--checkpoint-every must be at least 1, got {every}")
        self.folder, self.every = Path(folder), every
        self.fingerprint = json.loads(json.dumps(fingerprint))  # normalised as it will read back
        if restart and self.folder.exists():
            shutil.rmtree(self.folder)
        run = self.folder / "run.json"
        if run.is_file():
            try:
                old = json.loads(run.read_text())
            except json.JSONDecodeError:
                old = None
            if old != self.fingerprint:
                changed = sorted(k for k in set(self.fingerprint) | set(old or {})
                                 if (old or {}).get(k) != self.fingerprint.get(k))
                raise BillmError(f"{self.folder} holds the progress of a different run (differs in: "
                                 f"{', '.join(changed) or 'unreadable run.json'}); rerun with --restart to discard it")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(run, self.fingerprint)

    def _block_file(self, i: int) -> Path:
        return self.folder / f"block-{i:04d}.safetensors"

    def load(self) -> Optional[ResumeState]:
        """The state to resume from, or None when nothing was finished."""
        from safetensors import safe_open

        hidden_file = self.folder / "hidden.safetensors"
        done_file = self.folder / "done.json"
        if done_file.is_file():
            last, hidden, fp_hidden = json.loads(done_file.read_text())["after_block"], None, None
            if (self.folder / "final.safetensors").is_file():
                with safe_open(str(self.folder / "final.safetensors"), "pt") as f:
                    fp_hidden = _read_stream(f, "fp")
        elif hidden_file.is_file():
            with safe_open(str(hidden_file), "pt") as f:
                last = int(f.metadata()["after_block"])
                hidden = _read_stream(f)
                fp_hidden = _read_stream(f, "fp") if "fp0" in f.keys() else None
        else:
            return None
        layers, stored, phases = self._read_blocks(last)
        log.info("resuming after block %d (%d layers done) from %s", last, len(layers), self.folder)
        return ResumeState(last + 1, layers, stored, hidden, phases, fp_hidden)

    def packed(self, last: int) -> dict[str, StoredWeight]:
        """The packed layers of blocks ``0..last`` as recorded (qualified layer name -> stored weight)."""
        return self._read_blocks(last)[1]

    def field_reader(self, last: int) -> tuple[set[str], Callable[[str], Tensor]]:
        """The packed fields recorded for blocks ``0..last``, by their names in a checkpoint
        (``<layer>.packed_<field>``), and a function that reads one of them from its block's file (one at a time:
        what :func:`billm.save` streams from when the run did not read them back).

        Raises:
            BillmError: a block's record is missing.
        """
        from safetensors import safe_open

        from .packing.linear import PREFIX

        where: dict[str, tuple[Path, str]] = {}
        for path, f in self._block_files(last):
            for name, spec in json.loads(f.metadata()["block"])["stored"].items():
                where.update({f"{name}.{PREFIX}{field}": (path, f"{name}.{field}") for field in spec["fields"]})

        def read(name: str) -> Tensor:
            path, key = where[name]
            with safe_open(str(path), "pt") as f:
                return f.get_tensor(key)

        return set(where), read

    def _block_files(self, last: int) -> Iterator[tuple[Path, Any]]:
        """(path, open safetensors file) of each recorded block ``0..last``, in order.

        Raises:
            BillmError: a block's record is missing.
        """
        from safetensors import safe_open

        for i in range(last + 1):
            path = self._block_file(i)
            if not path.is_file():
                raise BillmError(f"{self.folder}: block {i} is missing although block {last} finished; "
                                 "rerun with --restart")
            with safe_open(str(path), "pt") as f:
                yield path, f

    def _read_blocks(self, last: int) -> tuple[list[dict[str, Any]], dict[str, StoredWeight], dict[str, float]]:
        layers: list[dict[str, Any]] = []
        stored: dict[str, StoredWeight] = {}
        phases: dict[str, float] = {}
        for _, f in self._block_files(last):
            meta = json.loads(f.metadata()["block"])
            for name, spec in meta["stored"].items():
                tensors = {field: f.get_tensor(f"{name}.{field}") for field in spec["fields"]}
                stored[name] = StoredWeight(spec["format"], tuple(spec["shape"]), spec["meta"], tensors)
            layers.extend(meta["layers"])
            for k, v in meta["phases"].items():
                phases[k] = phases.get(k, 0.0) + v
        return layers, stored, phases

    def record_block(self, i: int, layers: list, stored: dict[str, StoredWeight], hidden: Optional[list[Tensor]],
                     phases: dict[str, float], fp_hidden: Optional[list[Tensor]] = None) -> None:
        """Record block ``i`` as finished: its packed weights and reports, then its output activations.

        ``hidden`` is None for the last block (nothing follows it). ``fp_hidden``: the full-precision stream (block
        reconstruction's ``fpinputs``, end-to-end tuning's ``fp`` target), saved beside ``hidden`` (keys ``fp0``,
        ``fp1``, ...), and after the last block in ``final.safetensors``.
        """
        meta = {"layers": [asdict(r) for r in layers], "phases": phases,
                "stored": {n: {"format": s.format, "shape": list(s.shape), "meta": s.meta, "fields": sorted(s.tensors)}
                           for n, s in stored.items()}}
        tensors = {f"{n}.{field}": t.detach().cpu().contiguous() for n, s in stored.items() for field, t in s.tensors.items()}
        fault_point("before-block", i)
        _save_atomic(tensors, self._block_file(i), {"block": json.dumps(meta)}, "block", i)
        fault_point("after-block", i)
        if hidden is None:
            if fp_hidden is not None:  # the full-precision stream's end: the targets of end-to-end tuning
                _save_atomic(_stream_tensors(fp_hidden, "fp"), self.folder / "final.safetensors", {"batches": str(len(fp_hidden))}, "final", i)
            write_json_atomic(self.folder / "done.json", {"after_block": i})
        elif (i + 1) % self.every:
            return  # activations saved every `every` blocks: a resumed run redoes the blocks since
        else:
            acts = {**_stream_tensors(hidden), **_stream_tensors(fp_hidden or [], "fp")}
            _save_atomic(acts, self.folder / "hidden.safetensors",
                         {"after_block": str(i), "batches": str(len(hidden))}, "hidden", i)
        fault_point("after-hidden", i)

    def clear(self) -> None:
        """Remove the progress folder (after the checkpoint is safely written)."""
        shutil.rmtree(self.folder, ignore_errors=True)
