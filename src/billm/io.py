"""Atomic file and folder output: never leave a half-written file or folder under the final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import BillmError


def follow_umask(path: Path, directory: bool = False) -> None:
    """mkstemp/mkdtemp create private (0600/0700) entries; give them the usual umask-based mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if directory else 0o666) & ~mask)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None], before_rename: Optional[Callable[[], None]] = None) -> None:
    """Create ``path`` through ``write(tmp)`` on a temporary name beside it, fsync, and one rename.

    ``before_rename`` runs after the data is on disk and before the rename (fault-injection tests).
    On any failure the temporary file is removed and an existing ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        fsync_path(Path(tmp))
        follow_umask(Path(tmp))
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (:func:`write_atomic`): never a half-written file."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    write_atomic(path, write)


def check_output_dir(out: Path, is_ours: Callable[[Path], bool], what: str = "billm output") -> Path:
    """Resolve ``out`` and refuse folders we must not replace (someone else's data, the working directory)."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out.is_dir() and is_ours(out)):
        raise BillmError(f"refusing to overwrite {out}: it exists and is not a {what} folder; choose another --out")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise BillmError(f"refusing to write the output over {out}, which holds the working directory")
    return out


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename.

    Files written into the folder are fsynced before the rename; on any failure the temporary
    folder is removed and a previous ``out`` is left as it was.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    follow_umask(tmp, directory=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                follow_umask(f)  # some writers create private files; the output is an ordinary folder
                fsync_path(f)
        fsync_path(tmp)
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
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_disk_space(folder: Path, need_bytes: int, what: str) -> None:
    """Fail early when ``folder``'s file system has less than ``need_bytes`` free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise BillmError(f"not enough disk space for {what}: about {need_bytes / 1e9:.2f} GB needed in {probe}, "
                         f"{free / 1e9:.2f} GB free; free some space or choose another --out")
