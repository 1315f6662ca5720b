"""Atomic file writes, so a crash never leaves a half-written file under its final name.

:func:`atomic_path` is the one implementation: a temporary file in the same folder, fsync, rename.
:func:`atomic_write_bytes` / :func:`atomic_write_text` are its two common uses. (A checkpoint is a whole
directory made atomic the same way, in :mod:`worldflow.checkpoint`.) :func:`run_lock` keeps a second
process from writing the same run directory.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from worldflow.errors import WorldflowError


@contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path``; on a clean exit fsync it, give it a plain open()'s
    permissions and rename it onto ``path``; on an error remove it. The parent folder is created.

    The temporary is a hidden ``.<name>.<random>.tmp``; ``keep_suffix`` ends it in ``path``'s suffix
    instead, for writers that pick a format by extension (PyAV's muxers).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if keep_suffix else ".tmp"
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)  # mkstemp creates 0600; a plain open() gives 0666 less the umask
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


class RunLockedError(WorldflowError, RuntimeError):
    """Another process is writing the same run directory."""


@contextmanager
def run_lock(run: str | Path, what: str) -> Iterator[None]:
    """Hold ``<run>/.lock`` (an exclusive ``flock``, released by the kernel if the holder dies) for as long
    as the block runs; a second process raises RunLockedError naming the holder's pid.

    Under torchrun only rank 0 takes it (the trainer skips it on the other ranks, which write nothing on
    their own). Where ``fcntl`` does not exist (Windows) nothing is locked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = Path(run) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that left no note"
        f.close()
        raise RunLockedError(f"run directory {run} is in use by {holder} (lock file {path}): wait for it to "
                             f"finish or stop it, or use another --run") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()} ({what}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        f.flush()
        yield
    finally:
        f.truncate(0)
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
