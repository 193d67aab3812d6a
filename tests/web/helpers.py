"""Helpers shared by the web tests: tiny settings, waiting for a phase, store snapshots, a live server."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from apa.store import SessionStore

TINY = {"sampler": {"particles": 8, "steps": 5}, "surrogate": {"epochs": 10},
        "session": {"per_round": 4, "budget": 8, "eval_samples": 8, "seed": 3}, "feedback": {"name": "human"}}
TINY_FLAGS = ["--particles", "8", "--steps", "5", "--per-round", "4", "--budget", "8", "--epochs", "10",
              "--eval-samples", "8"]
WAIT_S = 240  # generous: these machines are often shared with training jobs


def wait_for(get_state, phases: tuple[str, ...], timeout: float = WAIT_S) -> dict:
    """Poll ``get_state()`` until its phase is one of ``phases``; fail on 'error' or after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        state = get_state()
        if state["phase"] in phases:
            return state
        assert state["phase"] != "error", state["message"]
        assert time.monotonic() < deadline, f"still {state['phase']} after {timeout} s (waiting for {phases})"
        time.sleep(0.1)


def wait_phase(client, token: str, *phases: str) -> dict:
    return wait_for(lambda: client.get(f"/api/sessions/{token}").json(), phases)


def snapshot(data_dir: Path) -> dict:
    """Everything the stores hold that a request could change: rounds, ratings, files."""
    out = {}
    for d in sorted(p for p in Path(data_dir).iterdir() if p.is_dir()):
        store = SessionStore.read(d)  # the server holds these sessions open
        try:
            out[d.name] = {"ratings": store.ratings(), "spent": store.spent(),
                           "rounds": [(r["round"], r["status"], r["shown"]) for r in store.rounds()],
                           "files": sorted(str(p.relative_to(d)) for p in d.rglob("*") if "sqlite" not in p.name)}
        finally:
            store.close()
    return out


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class LiveServer:
    """A real uvicorn server on a free loopback port, in a thread."""

    def __init__(self, app, config=None):
        """``config(app, **settings)``: the uvicorn.Config to run (default uvicorn's own)."""
        import uvicorn

        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server((config or uvicorn.Config)(app, log_level="warning", access_log=False,
                                                                limit_concurrency=200, backlog=256))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
