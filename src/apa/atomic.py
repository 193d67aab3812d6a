"""Files written atomically: a reader sees the old file or the whole new one, never a part of it."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, mode: int = 0o600, shared: bool = False) -> None:
    """``data`` to ``path`` atomically: a temporary file, fsync, rename into place, fsync the directory.

    Session files keep the default 0600 (their one writer holds the session's lock, so a crash's
    temporary file is reused by the next write); ``shared``: several processes may write ``path``
    at once (a dataset cache), so each writes its own temporary file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
