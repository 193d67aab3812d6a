"""End to end in a real browser: Debian's chromium, driven by Playwright (npm playwright-core, tests/web/e2e.mjs).

`apa serve` runs as a subprocess; the page starts a session and rates two rounds by clicking; the server is
restarted; the page (reloaded, and a new tab on the bare address) shows the same session at the same round.
A screenshot goes to the test's tmp dir and is copied to tests/web/artifacts/.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]' torch==2.13.0")

from apa.store import SessionStore  # noqa: E402
from tests.web.helpers import TINY_FLAGS, WAIT_S, free_socket  # noqa: E402

HERE = Path(__file__).parent
CHROMIUM = os.environ.get("APA_E2E_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
INSTALL = "run `sudo scripts/install-test-deps.sh` (installs chromium, node and playwright-core)"

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason=f"chromium is not installed; {INSTALL}")


def prior_weights(tiny_weights: Path) -> Path:
    """$APA_WEB_TEST_WEIGHTS, else the shipped MNIST prior if present (a nicer screenshot), else the tiny one."""
    from apa.priors.ddpm import weights_path

    chosen = os.environ.get("APA_WEB_TEST_WEIGHTS")
    if chosen:
        return Path(chosen)
    return weights_path("mnist") if weights_path("mnist").is_file() else tiny_weights


def start_server(port: int, data_dir: Path, weights: Path, log: Path) -> subprocess.Popen:
    """`apa serve` in a subprocess; returns once it answers."""
    cmd = [sys.executable, "-m", "apa.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--prior-weights", str(weights), *TINY_FLAGS, "--budget", "12", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=HERE.parent.parent)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"apa serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        assert time.monotonic() < deadline, f"apa serve did not answer within 120 s:\n{log.read_text()}"
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def driver(url: str, profile: Path, screenshot: Path) -> subprocess.Popen:
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.fail(f"node or tests/web/node_modules/playwright-core is missing; {INSTALL}")
    env = {**os.environ, "APA_E2E_URL": url, "APA_E2E_CHROMIUM": CHROMIUM, "APA_E2E_PROFILE": str(profile),
           "APA_E2E_SCREENSHOT": str(screenshot)}
    return subprocess.Popen([node, str(HERE / "e2e.mjs")], cwd=HERE, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def events(proc: subprocess.Popen) -> "queue.Queue[dict]":
    """The driver's JSON lines, as they come (other output is kept as {"event": "log"})."""
    q: queue.Queue[dict] = queue.Queue()

    def read() -> None:
        for line in proc.stdout:
            try:
                q.put(json.loads(line))
            except ValueError:
                q.put({"event": "log", "line": line.rstrip()})
        q.put({"event": "exit"})

    threading.Thread(target=read, daemon=True).start()
    return q


def expect(q: "queue.Queue[dict]", name: str, timeout: float = WAIT_S * 3) -> dict:
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ev = q.get(timeout=1)
        except queue.Empty:
            continue
        if ev["event"] == name:
            return ev
        seen.append(ev)
        if ev["event"] in ("failed", "exit"):
            break
    raise AssertionError(f"the browser driver did not report {name!r}; it said: {seen}")


def test_rate_two_rounds_restart_and_resume(tmp_path, tiny_weights):
    data, log = tmp_path / "sessions", tmp_path / "server.log"
    screenshot = tmp_path / "apa-serve.png"
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    weights = prior_weights(tiny_weights)
    server = start_server(port, data, weights, log)
    browser = driver(f"http://127.0.0.1:{port}/", tmp_path / "chromium-profile", screenshot)
    try:
        q = events(browser)
        rated = expect(q, "rated")
        assert (rated["phase"], rated["round"], rated["spent"], rated["history"]) == ("ready", 2, 7, 2), rated
        assert rated["hash"] == f"#s={rated['token']}"
        stop_server(server)
        server = start_server(port, data, weights, log)
        browser.stdin.write("restarted\n")
        browser.stdin.flush()
        resumed = expect(q, "resumed")
    finally:
        stop_server(server)
        if browser.poll() is None:
            browser.kill()
    for view in (resumed["reloaded"], resumed["newTab"]):
        assert (view["phase"], view["round"], view["spent"], view["history"], view["images"]) == \
            ("ready", 2, 7, 2, 4), view
    assert resumed["problems"] == [], resumed["problems"]
    store = SessionStore.open(data / rated["token"])
    assert store.spent() == 7 and len(store.ratings()) == 8 and len(store.rounds()) == 3
    assert screenshot.stat().st_size > 10_000
    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(screenshot, artifacts / screenshot.name)
