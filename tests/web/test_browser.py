"""End to end in a real browser: Debian's chromium, driven by Playwright (npm playwright-core, tests/web/e2e.mjs).

`apa serve` runs as a subprocess. The page starts a session; choices survive a reload; the server is stopped
while the first submission is in flight, the page keeps the ratings and retries, and after the restart they
are stored once. The keys alone rate the second round. After another restart the page (reloaded, and a new tab
on the bare address) shows the same session at the same round. The page then rates the rest of the budget and
the finished page's report link opens the report. A second session starts from an image the person gives
(round 0, rated liked). Screenshots of a round, the history and the finished page,
at 1280 and 390 px, go to the test's tmp dir and are copied to tests/web/artifacts/ (git-ignored).
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
           "--prior-weights", str(weights), *TINY_FLAGS, "--budget", "12", "--seed", "3", "--log-level", "warning"]
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


def driver(url: str, profile: Path, shots: Path) -> subprocess.Popen:
    node = shutil.which("node")
    if node is None or not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.fail(f"node or tests/web/node_modules/playwright-core is missing; {INSTALL}")
    env = {**os.environ, "APA_E2E_URL": url, "APA_E2E_CHROMIUM": CHROMIUM, "APA_E2E_PROFILE": str(profile),
           "APA_E2E_SHOTS": str(shots)}
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


def answer(browser: subprocess.Popen, line: str) -> None:
    browser.stdin.write(line + "\n")
    browser.stdin.flush()


def test_outage_hotkeys_restart_and_report(tmp_path, tiny_weights):
    data, log, shots = tmp_path / "sessions", tmp_path / "server.log", tmp_path / "shots"
    shots.mkdir()
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    weights = prior_weights(tiny_weights)
    server = start_server(port, data, weights, log)
    browser = driver(f"http://127.0.0.1:{port}/", tmp_path / "chromium-profile", shots)
    try:
        q = events(browser)
        expect(q, "submitting")  # the page has sent round 1's ratings; they have not reached the server
        stop_server(server)
        answer(browser, "stopped")
        expect(q, "retrying")
        server = start_server(port, data, weights, log)
        answer(browser, "restarted")
        rated = expect(q, "rated")
        stop_server(server)
        server = start_server(port, data, weights, log)
        answer(browser, "restarted")
        finished = expect(q, "finished")
    finally:
        stop_server(server)
        if browser.poll() is None:
            browser.kill()

    assert rated["firstTitle"] == "Round 1 of 3", rated["firstTitle"]
    assert rated["draft"] == [5, 4, None, None], "choices not sent yet must survive a reload"
    assert "kept" in rated["retrying"]["status"] and rated["retrying"]["kept"] == [5, 4, "skip", 2], rated["retrying"]
    keyed = rated["expectedKeys"]
    assert rated["keyed"] == keyed and len(keyed) >= 1, rated
    spent = 3 + sum(v != "skip" for v in keyed)
    assert rated["mobileSubmit"], "on a 390 px screen the Submit button must stay in view"
    assert (rated["phase"], rated["round"], rated["spent"], rated["history"]) == ("ready", 2, spent, 2), rated
    assert rated["hash"] == f"#s={rated['token']}"
    for view in (finished["reloaded"], finished["newTab"]):
        assert (view["phase"], view["round"], view["spent"], view["history"]) == ("ready", 2, spent, 2), view
        assert view["images"] >= 1, view
    assert finished["problems"] == [], finished["problems"]
    given = finished["given"]  # a second session, started from one image the person gave
    assert given["token"] != rated["token"] and (given["phase"], given["round"], given["spent"]) == ("ready", 1, 1), given

    store = SessionStore.open(data / rated["token"])
    try:
        by_round: dict[int, list] = {}
        for x in store.ratings():
            by_round.setdefault(x["round"], []).append((x["position"], x["score"]))
        assert sorted(by_round[0]) == [(0, 5.0), (1, 4.0), (2, None), (3, 2.0)], "the held submission, stored once"
        assert sorted(by_round[1]) == [(p, None if v == "skip" else float(v)) for p, v in enumerate(keyed)], \
            "the round rated with the keys"
        assert store.spent() == 12
    finally:
        store.close()

    report = finished["reportPage"]
    assert report["url"] == f"/api/sessions/{rated['token']}/report/report.html", report
    assert report["heading"] and report["images"] >= 3 and "rated by a person" in report["text"], report
    for d in finished["downloads"]:
        assert d["status"] == 200 and d["bytes"] > 100, d
    assert {d["type"] for d in finished["downloads"]} == {"application/zip", "image/png"}

    artifacts = HERE / "artifacts"
    artifacts.mkdir(exist_ok=True)
    for shot in sorted(shots.glob("*.png")):
        assert shot.stat().st_size > 5_000, shot
        shutil.copy(shot, artifacts / shot.name)
    assert {p.name for p in shots.glob("*.png")} >= {f"{v}-{w}.png" for v in ("round", "history", "finished")
                                                     for w in (1280, 390)}
