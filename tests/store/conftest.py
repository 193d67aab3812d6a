"""One local PostgreSQL per test process (scripts/postgres.sh in a temporary directory), for the stores' tests."""

from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "postgres.sh"


def postgres_installed() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb") or shutil.which("initdb"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Postgres:
    """A running server: ``url`` of its database ``apa``; ``restart()`` cuts every client off, as a real restart
    does; ``down()`` and ``up()`` the same with an outage as long as the caller keeps it down."""

    def __init__(self, directory: Path, url: str):
        self.directory, self.url = directory, url

    def restart(self) -> None:
        self._script("restart")

    def down(self) -> None:
        """Stop the server until :meth:`up` (every client cut off; new connections refused)."""
        self._script("down")

    def up(self) -> None:
        self._script("up")

    def _script(self, command: str) -> None:
        subprocess.run(["bash", str(SCRIPT), command, str(self.directory)], check=True, timeout=60)


@pytest.fixture(scope="session")
def postgres():
    """A server on a free port of 127.0.0.1; skipped only where PostgreSQL is not installed (CI installs it:
    scripts/install-test-deps.sh)."""
    if not postgres_installed():
        pytest.skip("PostgreSQL's binaries (initdb, pg_ctl) are absent: run scripts/install-test-deps.sh as root")
    directory = Path(tempfile.mkdtemp(prefix="apa-postgres-"))  # under /tmp: the server's user must reach it
    try:
        out = subprocess.run(["bash", str(SCRIPT), "start", str(directory), str(free_port())], check=True,
                             capture_output=True, text=True, timeout=120)
        yield Postgres(directory, out.stdout.strip().splitlines()[-1])
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(directory)], capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
