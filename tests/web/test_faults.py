"""Faults around the web server's sessions: deep JSON, a submission cut by a crash, concurrent creates
past --max-sessions, a second server on the same sessions, and who may read the files."""

from __future__ import annotations

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
    import apa.store

    token = client.post("/api/sessions").json()["token"]
    wait_phase(client, token, "ready")
    before = snapshot(manager.data_dir)
    real, calls = apa.store.time, {"n": 0}

    class DiesOnThirdInsert:
        @staticmethod
        def time() -> float:
            calls["n"] += 1
            if calls["n"] == 3:
                raise Crash
            return real.time()

    monkeypatch.setattr(apa.store, "time", DiesOnThirdInsert)
    with pytest.raises(Crash):
        client.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": [1, 1, 1, 1]})
    monkeypatch.setattr(apa.store, "time", real)
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
