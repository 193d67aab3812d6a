"""Twenty people at once against a real uvicorn server on loopback."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]' torch==2.13.0")

from tests.web.helpers import WAIT_S, snapshot, wait_for  # noqa: E402

PEOPLE = 20


def one_person(url: str, i: int, results: dict, barrier: threading.Barrier) -> None:
    """Start a session, wait for its first round, look at the images, rate them."""
    import httpx

    with httpx.Client(base_url=url, timeout=WAIT_S) as c:
        barrier.wait()
        r = c.post("/api/sessions")
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        state = wait_for(lambda: c.get(f"/api/sessions/{token}").json(), ("ready",))
        assert state["round"] == 0 and state["spent"] == 0
        for p in range(state["images"]):
            img = c.get(f"/api/sessions/{token}/rounds/0/images/{p}.png")
            assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        scores = [1 + (i + p) % 5 for p in range(state["images"])]
        r = c.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": scores})
        assert r.status_code == 200, r.text
        results[i] = (token, scores)


def test_twenty_concurrent_sessions(make_manager):
    from apa.web.server import create_app
    from tests.web.helpers import LiveServer

    manager = make_manager(workers=2, fixed_seed=False)
    results, errors = {}, []
    barrier = threading.Barrier(PEOPLE)

    def run(i: int) -> None:
        try:
            one_person(server.url, i, results, barrier)
        except BaseException as e:  # reported below with the person's number
            errors.append((i, repr(e)))

    with LiveServer(create_app(manager)) as server:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(PEOPLE)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT_S * 2)
    assert not errors, errors
    assert len(results) == PEOPLE and len({token for token, _ in results.values()}) == PEOPLE
    stored = snapshot(manager.data_dir)
    assert len(stored) == PEOPLE
    for token, scores in results.values():
        assert [x["score"] for x in stored[token]["ratings"] if x["round"] == 0] == scores
