"""Faults around the web server's sessions: deep JSON, a submission cut by a crash, concurrent creates
past --max-sessions (in one server and across two), a second server on the same sessions, damaged
sessions refused at open, what error bodies tell a client, connections that send nothing, and who
may read the files."""

from __future__ import annotations

import re
import stat
import threading

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]' torch==2.13.0")

from tests.web.helpers import snapshot, wait_phase  # noqa: E402

JSON = {"Content-Type": "application/json"}


def test_json_nested_ten_thousand_deep_is_a_400(client):
    deep = b'{"ratings": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    r = client.post(f"/api/sessions/{'x' * 43}/rounds/0/ratings", content=deep, headers=JSON)
    assert r.status_code == 400 and "nests too deeply" in r.json()["error"]


class Crash(Exception):
    """The process dying between two of a submission's inserts."""


def test_a_submission_cut_by_a_crash_stores_nothing_and_a_resubmission_counts(client, manager, monkeypatch):
    import apa.store.sqlite

    token = client.post("/api/sessions").json()["token"]
    wait_phase(client, token, "ready")
    before = snapshot(manager.data_dir)
    real, calls = apa.store.sqlite.time, {"n": 0}

    class DiesOnThirdInsert:
        @staticmethod
        def time() -> float:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Crash
            return real.time()

    monkeypatch.setattr(apa.store.sqlite, "time", DiesOnThirdInsert)
    with pytest.raises(Crash):
        client.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": [1, 1, 1, 1]})
    monkeypatch.setattr(apa.store.sqlite, "time", real)
    assert snapshot(manager.data_dir) == before  # none of the four, not one of them
    r = client.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": [5, 4, None, 2]})
    assert r.status_code == 200, r.text
    assert [x["score"] for x in snapshot(manager.data_dir)[token]["ratings"]] == [5.0, 4.0, None, 2.0]


def test_concurrent_creates_stop_at_max_sessions(make_manager):
    from apa.web.sessions import WebError

    manager = make_manager(max_sessions=3)
    barrier, made, refused = threading.Barrier(12), [], []

    def create() -> None:
        barrier.wait()
        try:
            made.append(manager.create())
        except WebError as e:
            refused.append(e.status)

    threads = [threading.Thread(target=create) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(made) == 3 and refused == [503] * 9
    assert manager.count() == 3


def test_a_second_server_cannot_open_a_held_session(client, manager, make_manager):
    from apa.web.sessions import WebError

    token = client.post("/api/sessions").json()["token"]
    wait_phase(client, token, "ready")
    other = make_manager(manager.data_dir)
    with pytest.raises(WebError, match="open in another process") as e:
        other.get(token)
    assert e.value.status == 503


def test_sessions_are_private_to_the_server_user(client, manager):
    token = client.post("/api/sessions").json()["token"]
    wait_phase(client, token, "ready")
    assert stat.S_IMODE(manager.data_dir.stat().st_mode) == 0o700
    paths = list((manager.data_dir / token).rglob("*"))
    assert any(p.name.endswith(".safetensors") for p in paths) and any(p.name.endswith("-wal") for p in paths)
    for p in [manager.data_dir / token, *paths]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def _files(root) -> dict:
    """Every file's bytes (but the lock's and SQLite's shared-memory index)."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "session.lock" and not p.name.endswith("-shm")}


def _ready_session(make_manager):
    """A session waiting for its first ratings, in a data directory no server holds any more."""
    from tests.web.helpers import wait_for

    first = make_manager()
    token = first.create()
    wait_for(lambda: first.state(token), ("ready",))
    first.close()
    return first.data_dir, token


def _flip(path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["a flipped bit in the round file", "a deleted ledger"])
def test_a_damaged_session_is_refused_at_open_before_it_takes_a_rating(make_manager, damage):
    from apa.web.sessions import WebError

    data, token = _ready_session(make_manager)
    root = data / token
    if damage == "a deleted ledger":
        (root / "session.ledger").unlink()
    else:
        _flip(root / "rounds" / "round_0000.safetensors")
    before = _files(root)
    server = make_manager(data)
    for call in (lambda: server.state(token), lambda: server.submit(token, 0, {"ratings": [5, 5, 5, 5]})):
        with pytest.raises(WebError) as e:
            call()
        assert "damaged" in e.value.message or "ledger" in e.value.message, e.value.message
        assert not re.search(r"(^|[\s('\"`])/", e.value.message), e.value.message  # no absolute path
    assert _files(root) == before


def test_error_bodies_name_no_server_path_and_no_pid(client, manager, make_manager):
    import os

    from apa.web.sessions import WebError

    token = client.post("/api/sessions").json()["token"]
    wait_phase(client, token, "ready")
    other = make_manager(manager.data_dir)
    with pytest.raises(WebError) as e:
        other.get(token)
    assert str(os.getpid()) not in e.value.message and not re.search(r"(^|[\s('\"`])/", e.value.message), \
        e.value.message


def test_max_sessions_counts_every_server_on_the_data_dir(make_manager, tmp_path):
    """Two servers on one data directory, --max-sessions 3 each: 3 sessions in all."""
    from apa.web.sessions import WebError

    servers = [make_manager(tmp_path / "shared", max_sessions=3) for _ in range(2)]
    barrier, made, refused = threading.Barrier(8), [], []

    def create(server) -> None:
        barrier.wait()
        try:
            made.append(server.create())
        except WebError as e:
            refused.append(e.status)

    threads = [threading.Thread(target=create, args=(servers[i % 2],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(made) == 3 and refused == [503] * 5
    assert servers[0].count() == 3


def test_a_whole_web_session_keeps_its_report_private(manager):
    from tests.web.helpers import wait_for

    token = manager.create()
    for r in range(2):
        wait_for(lambda: manager.state(token), ("ready",))
        manager.submit(token, r, {"ratings": [5, 1, 4, 2]})
    wait_for(lambda: manager.state(token), ("done",))
    root = manager.data_dir / token
    assert (root / "report.html").is_file() and (root / "grids").is_dir()
    for p in [root, *root.rglob("*")]:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_silent_and_slow_header_connections_are_closed(manager, monkeypatch):
    """A connection that sends nothing, or never finishes its headers, is closed after the header timeout;
    one idle after a response after the keep-alive timeout."""
    import socket
    import time

    from apa.web import server
    from apa.web.server import create_app
    from tests.web.helpers import LiveServer

    monkeypatch.setattr(server, "HEADER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(server, "KEEP_ALIVE_S", 1)
    with LiveServer(create_app(manager), config=server.uvicorn_config) as live:
        host, port = live.url.rsplit("/", 1)[1].split(":")
        sends = {"silent": b"", "slow headers": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1",
                 "idle after a response": b"GET /static/style.css HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"}
        for what, data in sends.items():
            with socket.create_connection((host, int(port)), timeout=10) as c:
                t0 = time.monotonic()
                c.sendall(data)
                got = b""
                while chunk := c.recv(65536):  # until the server closes the connection (or 10 s pass)
                    got += chunk
                assert time.monotonic() - t0 < 8, what
                assert (b"200 OK" in got) == (what == "idle after a response"), (what, got[:200])


def test_an_error_body_names_no_data_directory_and_no_file(make_manager, tmp_path, monkeypatch):
    """Hole 9: with a relative --data-dir, a damaged session's error names neither the directory nor a file."""
    from pathlib import Path

    from apa.web.sessions import WebError

    monkeypatch.chdir(tmp_path)
    data, token = _ready_session(lambda d=None, **kw: make_manager(d or Path("srvd"), **kw))
    _flip(data / token / "rounds" / "round_0000.safetensors")
    server = make_manager(Path("srvd"))
    with pytest.raises(WebError) as e:
        server.state(token)
    message = e.value.message
    assert "srvd" not in message and "/" not in message and "safetensors" not in message, message
    assert "operator" in message, message
