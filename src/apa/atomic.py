"""Files written atomically: a reader sees the old file or the whole new one, never a part of it."""

from __future__ import annotations

import functools
import os
import threading
from pathlib import Path
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])
_UMASK = threading.Lock()


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
    at once (a dataset cache), so each writes its own temporary file. A failed write removes its
    temporary file."""
    place(stage_file(path, data, mode, shared), path)


def stage_file(path: Path, data: bytes, mode: int = 0o600, shared: bool = False) -> Path:
    """The first half of ``write_file``: ``data`` in a temporary file beside ``path``, fsync'ed;
    returns that file (removed again if the write fails: a full disk leaves nothing behind)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp" if shared else f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return tmp


def place(tmp: Path, path: Path) -> None:
    """The second half of ``write_file``: rename a staged file into place and make that durable."""
    os.replace(tmp, path)
    fsync_dir(path.parent)


def private(fn: F) -> F:
    """``fn`` run under umask 077, so that every file and folder it makes (images, reports) is its
    user's alone: 0600 and 0700, like the session's own files. The umask is the process's, so calls
    are serialised; stricter modes are all that other threads may see meanwhile."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        with _UMASK:
            old = os.umask(0o077)
            try:
                return fn(*args, **kwargs)
            finally:
                os.umask(old)

    return run  # type: ignore[return-value]
