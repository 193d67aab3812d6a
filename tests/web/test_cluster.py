"""`apa serve --ray`: the Ray Serve application (apa.web.cluster) on a local Ray (2 ingress and 2 engine
replicas) and a local PostgreSQL, started once for the module.

A session rated through one ingress replica and then the other ends as on the single-process server;
an engine replica killed mid-round, two writers at once, PostgreSQL restarted mid-session and a
damaged session are each answered without losing or corrupting anything acknowledged.
"""

from __future__ import annotations

import glob
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from apa.config import AlignConfig
from apa.session import with_overrides
from tests.store.conftest import free_port, postgres, postgres_installed  # noqa: F401  (postgres: the module's server)
from tests.web.helpers import TINY

pytestmark = pytest.mark.xdist_group("ray-cluster")  # one cluster: the module stays on one worker
ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'apa[cluster]'")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'apa[cluster]'")
if not postgres_installed():
    pytest.skip("PostgreSQL's binaries (initdb, pg_ctl) are absent: run scripts/install-test-deps.sh as root",
                allow_module_level=True)

SMALL = {**TINY, "session": {**TINY["session"], "budget": 16}}  # 4 rounds of 4 images
WAIT_S = 120


class Cluster:
    """The running application: its URL, data directory, database and replicas."""

    def __init__(self, url: str, data_dir: Path, pg):
        import httpx

        self.url, self.data_dir, self.pg = url, data_dir, pg
        self.http = httpx.Client(base_url=url, timeout=60)
        self.ingress = self.replicas_seen()

    def replicas_seen(self) -> list[str]:
        """The two ingress replicas' ids (the proxy spreads requests over them at random)."""
        seen: set[str] = set()
        deadline = time.monotonic() + 60
        while len(seen) < 2:
            assert time.monotonic() < deadline, f"only replicas {seen} answered"
            seen.add(self.http.get("/").headers["X-Apa-Replica"])
        return sorted(seen)

    def replica_pids(self, deployment: str) -> list[int]:
        """The processes of a deployment's live replicas (Ray titles each ``ray::ServeReplica:APP:DEPLOYMENT``)."""
        import psutil

        title = f"ray::ServeReplica:apa:{deployment}"
        return [p.pid for p in psutil.process_iter(["cmdline"])
                if (p.info["cmdline"] or [""])[0].startswith(title)]


@pytest.fixture(scope="module")
def cfg(tiny_weights) -> AlignConfig:
    return with_overrides(AlignConfig(), prior={"weights": str(tiny_weights)}, **SMALL)


@pytest.fixture(scope="module")
def cluster(postgres, cfg, tmp_path_factory):  # noqa: F811
    from apa.web.cluster import application, start_local

    data = tmp_path_factory.mktemp("shared")
    start_local(num_cpus=2, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(cfg, data, postgres.url, replicas=2, engines=2, fixed_seed=True), name="apa",
                  route_prefix="/")
        c = Cluster(f"http://127.0.0.1:{port}", data, postgres)
        yield c
        c.http.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


# ---------------------------------------------------------------- a person, through any server


def ratings_for(r: int, k: int) -> list[int]:
    return [1 + (3 * r + p) % 5 for p in range(k)]


def request(http, method: str, path: str, pin: str | None = None, retry: bool = True, **kwargs):
    """One request (pinned to an ingress replica by ``pin``); with ``retry``, 503s (honouring Retry-After)
    and dropped connections are tried again for up to WAIT_S."""
    import httpx

    headers = {"serve_multiplexed_model_id": pin} if pin else {}
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            response = http.request(method, path, headers=headers, **kwargs)
            if not (retry and response.status_code == 503):
                return response
            wait = float(response.headers.get("Retry-After", "1"))
        except httpx.TransportError:
            if not retry:
                raise
            wait = 0.5
        assert time.monotonic() < deadline, f"{method} {path} still failing after {WAIT_S} s"
        time.sleep(min(wait, 0.5))


def wait_state(http, token: str, phases: tuple[str, ...] = ("ready", "done"), pin: str | None = None) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        state = request(http, "GET", f"/api/sessions/{token}", pin).json()
        assert state["phase"] != "error", state["message"]
        if state["phase"] in phases and (state["phase"] != "done" or state["report"]):
            return state
        assert time.monotonic() < deadline, f"still {state['phase']} after {WAIT_S} s"
        time.sleep(0.1)


def rate(http, token: str, state: dict, pin: str | None = None) -> dict:
    """Post the round's ratings (retrying as the page does); the answer must acknowledge them."""
    r, k = state["round"], state["images"]
    response = request(http, "POST", f"/api/sessions/{token}/rounds/{r}/ratings", pin,
                       json={"ratings": ratings_for(r, k)})
    if response.status_code == 409:  # a retried post whose first try was stored
        assert "already been rated" in response.json()["error"]
    else:
        assert response.status_code == 200, response.text
    return {"round": r, "ratings": ratings_for(r, k)}


def run_person(http, pins: list[str | None] | None = None, on_rated=None) -> tuple[str, list[dict]]:
    """A whole session: each round's ratings through ``pins[round % len(pins)]``; ``on_rated(round, token)``
    after each acknowledged post. Returns the token and the acknowledged posts."""
    pins = pins or [None]
    token = request(http, "POST", "/api/sessions").json()["token"]
    acknowledged = []
    while (state := wait_state(http, token))["phase"] == "ready":
        acknowledged.append(rate(http, token, state, pins[state["round"] % len(pins)]))
        if on_rated:
            on_rated(state["round"], token)
    return token, acknowledged


def stored(root: Path, database: str | None) -> dict:
    """What a session holds: ratings, rounds, the shown particles per round, the final batch."""
    from apa.store import read_store

    store = read_store(root, database)
    try:
        rounds = store.rounds()
        shown = []
        for row in rounds:
            t = store.round_tensors(row["round"])
            shown.append(t["particles"][t["shown"].long()])
        return {"ratings": [(x["round"], x["position"], x["score"]) for x in store.ratings()],
                "rounds": [(row["round"], row["status"], row["shown"]) for row in rounds],
                "shown": shown, "final": store.final_images(),
                "report": store.report_path.with_suffix(".html").is_file()}
    finally:
        store.close()


def assert_same(a: dict, b: dict) -> None:
    assert a["ratings"] == b["ratings"] and a["rounds"] == b["rounds"]
    assert len(a["shown"]) == len(b["shown"]) and a["report"] and b["report"]
    for x, y in zip(a["shown"], b["shown"]):
        assert torch.allclose(x, y, atol=1e-4)
    assert a["final"] is not None and torch.allclose(a["final"], b["final"], atol=1e-4)


@pytest.fixture(scope="module")
def reference(cfg, tmp_path_factory) -> dict:
    """The same session (seed, configuration, ratings) on the single-process server."""
    from fastapi.testclient import TestClient

    from apa.web.server import create_app
    from apa.web.sessions import SessionManager

    data = tmp_path_factory.mktemp("single")
    manager = SessionManager(data, cfg, fixed_seed=True)
    try:
        with TestClient(create_app(manager)) as http:
            token, _ = run_person(http)
    finally:
        manager.close()
    return stored(data / token, None)


# ---------------------------------------------------------------- the tests


def test_a_session_rated_through_both_replicas_ends_as_on_one_process(cluster, reference):
    a, b = cluster.ingress
    seen = []
    token, acknowledged = run_person(cluster.http, [a, b], on_rated=lambda r, t: seen.append(
        request(cluster.http, "GET", f"/api/sessions/{t}", [a, b][r % 2]).headers["X-Apa-Replica"]))
    assert seen == [a, b, a, b]  # each round rated, and read back, through the replica it was pinned to
    assert_same(stored(cluster.data_dir / token, cluster.pg.url), reference)
    assert len(acknowledged) == 4
    png = request(cluster.http, "GET", f"/api/sessions/{token}/rounds/0/images/0.png", b)
    assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
    assert request(cluster.http, "GET", f"/api/sessions/{token}/report/report.html", a).status_code == 200


def held_once_free(root: Path, url: str):
    """The session's store opened, and so its lock held, by this process as soon as the replica that
    sampled round 0 lets it go (on busy cores the replica can still hold it when its state is first read;
    bounded by WAIT_S)."""
    from apa.store import open_store
    from apa.store.base import SessionBusy

    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            return open_store(root, url)
        except SessionBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_two_writers_never_write_one_session_at_once(cluster):
    a, b = cluster.ingress
    token = request(cluster.http, "POST", "/api/sessions").json()["token"]
    state = wait_state(cluster.http, token)
    root = cluster.data_dir / token
    holder = held_once_free(root, cluster.pg.url)  # another process writing the session
    try:
        for pin in (a, b):
            for path, body in (("/rounds/0/ratings", {"ratings": ratings_for(0, 4)}), ("/taste-changed", None)):
                answer = request(cluster.http, "POST", f"/api/sessions/{token}{path}", pin, retry=False, json=body)
                assert answer.status_code == 503 and answer.headers["Retry-After"] == "2", answer.text
                assert answer.json()["error"].startswith("this session is open in another process")
        assert holder.ratings() == []  # nothing was written
    finally:
        holder.close()
    answers: list = []
    go = threading.Barrier(2)

    def post(pin: str) -> None:
        go.wait()
        answers.append(request(cluster.http, "POST", f"/api/sessions/{token}/rounds/0/ratings", pin, retry=False,
                               json={"ratings": ratings_for(0, state["images"])}))

    threads = [threading.Thread(target=post, args=(pin,)) for pin in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(x.status_code for x in answers)
    assert codes in ([200, 409], [200, 503]), [x.text for x in answers]  # one stored, the other refused
    assert len(stored(root, cluster.pg.url)["ratings"]) == 4


def test_postgres_restarted_mid_session_loses_nothing(cluster, reference):
    outage = []

    def restart_while_rating(r: int, token: str) -> None:
        """PostgreSQL stopped after round 1's ratings and started again once a request has seen it down
        (bounded by WAIT_S; a restart timed by the clock alone can fall between two polls on busy cores)."""
        if r != 1:
            return
        cluster.pg.down()
        try:
            deadline = time.monotonic() + WAIT_S
            while not outage and time.monotonic() < deadline:
                answer = request(cluster.http, "GET", f"/api/sessions/{token}", retry=False)
                if answer.status_code == 503:
                    assert "database cannot be reached" in answer.json()["error"] and answer.headers["Retry-After"]
                    outage.append(answer.status_code)
                time.sleep(0.02)
        finally:
            cluster.pg.up()

    token, acknowledged = run_person(cluster.http, on_rated=restart_while_rating)
    assert outage, "no request saw the database down"
    after = stored(cluster.data_dir / token, cluster.pg.url)
    for post in acknowledged:
        assert [s for (r, _, s) in after["ratings"] if r == post["round"]] == [float(x) for x in post["ratings"]]
    assert_same(after, reference)


def test_a_damaged_session_is_refused_before_anything_is_written(cluster):
    import psycopg

    token = request(cluster.http, "POST", "/api/sessions").json()["token"]
    rate(cluster.http, token, wait_state(cluster.http, token))
    state = wait_state(cluster.http, token)
    assert state["round"] == 1
    root = cluster.data_dir / token
    before = stored(root, cluster.pg.url)
    tensor = root / "rounds" / "round_0000.safetensors"
    original = tensor.read_bytes()
    tensor.write_bytes(original[:-8] + bytes(8))  # damaged on the shared volume
    post = lambda: request(cluster.http, "POST", f"/api/sessions/{token}/rounds/1/ratings",  # noqa: E731
                           json={"ratings": ratings_for(1, 4)})
    answer = post()
    assert answer.status_code == 500 and "damaged" in answer.json()["error"], answer.text
    tensor.write_bytes(original)
    assert stored(root, cluster.pg.url)["ratings"] == before["ratings"]
    with psycopg.connect(cluster.pg.url, autocommit=True) as conn:  # a row lost from the database
        conn.execute("DELETE FROM apa_ratings WHERE session=%s AND round=0 AND position=0", (token,))
    answer = post()
    assert answer.status_code == 500 and "damaged" in answer.json()["error"], answer.text
    assert stored(root, cluster.pg.url)["ratings"] == before["ratings"][1:]  # nothing written
    assert glob.glob(str(root / "rounds" / "*.tmp")) == []


def engine_at_work(cluster) -> int | None:
    """The pid of the engine replica holding a session open now (connected to PostgreSQL), if any."""
    import psutil

    port = int(cluster.pg.url.rsplit(":", 1)[1].split("/")[0])
    for pid in cluster.replica_pids("Engine"):
        try:
            if any(c.raddr and c.raddr.port == port for c in psutil.Process(pid).net_connections("tcp")):
                return pid
        except psutil.NoSuchProcess:
            continue
    return None


# last of the cluster's tests: the killed replicas are replaced, with new ids, after it
def test_replicas_killed_mid_round_lose_nothing(cluster, reference):
    killed = []

    def kill_while_working(r: int, token: str) -> None:
        if r == 1:  # the engine replica refitting round 1 or sampling round 2
            deadline = time.monotonic() + 30
            while (pid := engine_at_work(cluster)) is None:
                assert time.monotonic() < deadline, "no engine replica took the round"
                time.sleep(0.01)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        if r == 2:  # an ingress replica, while the page polls and the next ratings are posted
            pid = cluster.replica_pids("Web")[0]
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    token, acknowledged = run_person(cluster.http, on_rated=kill_while_working)
    assert len(killed) == 2
    after = stored(cluster.data_dir / token, cluster.pg.url)
    for post in acknowledged:  # every acknowledged rating kept
        assert [s for (r, _, s) in after["ratings"] if r == post["round"]] == [float(x) for x in post["ratings"]]
    assert_same(after, reference)  # and the session ended like the uninterrupted one


@pytest.mark.parametrize("argv, says", [
    (["--ray", "local"], "--ray keeps every session in PostgreSQL: give --database"),
    (["--ray", "127.0.0.1:1", "--database", "postgresql://apa@127.0.0.1:1/apa"], "--ray 127.0.0.1:1: nothing answers"),
    (["--ray", "local", "--database", "postgresql://apa@127.0.0.1:1/apa"], "cannot reach the database"),
    (["--ray", "local", "--database", "postgresql://apa@127.0.0.1:1/apa", "--engines", "0"], "--engines must be"),
])
def test_the_command_refuses_bad_settings_in_one_line(argv, says, capsys, monkeypatch):
    from apa.cli import main

    monkeypatch.delenv("APA_DATABASE", raising=False)
    assert main(["serve", "--prior", "mnist", *argv]) != 0
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err


def test_without_ray_the_command_says_what_to_install(capsys, monkeypatch):
    import sys

    import apa.web
    from apa.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.delitem(sys.modules, "apa.web.cluster", raising=False)
    monkeypatch.delattr(apa.web, "cluster", raising=False)
    assert main(["serve", "--prior", "mnist", "--ray", "local", "--database", "postgresql://apa@127.0.0.1:1/apa"]) != 0
    assert "pip install 'apa[cluster]'" in capsys.readouterr().err
