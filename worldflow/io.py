"""Atomic file writes, so a crash never leaves a half-written file under its final name.

:func:`atomic_path` is the one implementation: a temporary file in the same folder, fsync, rename.
:func:`atomic_write_bytes` / :func:`atomic_write_text` are its two common uses. (A checkpoint is a whole
directory made atomic the same way, in :mod:`worldflow.checkpoint`.)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
