"""Malformed and hostile requests are refused with a 4xx and a readable message, and change nothing stored."""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]' torch==2.13.0")

from tests.web.helpers import snapshot, wait_phase  # noqa: E402
from apa.web.server import MAX_GIVEN_BODY  # noqa: E402

UNKNOWN = "x" * 43  # well formed, but no such session


@pytest.fixture
def rated_once(client, manager):
    """A session with round 0 rated and round 1 waiting, plus a second untouched session."""
    token = client.post("/api/sessions").json()["token"]
    other = client.post("/api/sessions").json()["token"]
    wait_phase(client, token, "ready")
    wait_phase(client, other, "ready")
    r = client.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": [5, 4, 1, 2]})
    assert r.status_code == 200
    wait_phase(client, token, "ready")
    return token, other


def refused(response, *statuses: int) -> str:
    assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    message = response.json()["error"]
    assert isinstance(message, str) and message
    return message


JSON = {"Content-Type": "application/json"}


def bad_tokens_and_paths(client, token: str) -> None:
    """Wrong or malformed tokens, and path traversal in every path parameter: 404 (or 422 for a number)."""
    for bad in (UNKNOWN, token[:-1], token + "A", "..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "%2e%2e%2fdata",
                f"{token[:20]}%2f..%2f{token[20:]}", "~", "%00" + token[:42]):
        refused(client.get(f"/api/sessions/{bad}"), 404)
        refused(client.post(f"/api/sessions/{bad}/rounds/1/ratings", json={"ratings": [5] * 4}), 404)
        refused(client.get(f"/api/sessions/{bad}/rounds/0/images/0.png"), 404)
    for path in (f"/api/sessions/{token}/rounds/0/images/..%2f..%2fsession.sqlite",
                 f"/api/sessions/{token}/rounds/%2e%2e/images/0.png", f"/api/sessions/{token}/rounds/0/images/-1.png",
                 f"/api/sessions/{token}/rounds/0/images/4.png", f"/api/sessions/{token}/rounds/7/grid.png",
                 f"/api/sessions/{token}/rounds/0/images/99999999999999999999999.png",
                 f"/api/sessions/{token}/..%2f{UNKNOWN}", f"/api/sessions/{token}/final.png",
                 "/static/..%2fserver.py", "/static/%2e%2e%2fsessions.py", "/static/index.html", "/static/../server.py",
                 "/api/sessions/%2e%2e/%2e%2e/config.json"):
        refused(client.get(path), 404, 422)


def bad_ratings(client, path: str) -> None:
    """Ratings out of range, of the wrong type or shape, unreadable JSON, not JSON, oversize bodies."""
    for values in ([0, 5, 5, 5], [6, 5, 5, 5], [-1, 5, 5, 5], [10**30, 5, 5, 5], [1e308, 5, 5, 5], [3.5, 5, 5, 5],
                   ["5", 5, 5, 5], [True, 5, 5, 5], [[5], 5, 5, 5], [{"score": 5}, 5, 5, 5], [5, 5, 5],
                   [5, 5, 5, 5, 5], []):
        assert "rating" in refused(client.post(path, json={"ratings": values}), 422)
    for body in ({}, {"ratings": 5}, {"ratings": [5] * 4, "round": 1}, [5, 5, 5, 5], "ratings", 5, None):
        refused(client.post(path, content=json.dumps(body), headers=JSON), 422)
    for raw in (b"{", b'{"ratings": [NaN, 5, 5, 5]}', b'{"ratings": [Infinity, 5, 5, 5]}', b"\xff\xfe", b""):
        refused(client.post(path, content=raw, headers=JSON), 400)
    refused(client.post(path, content=json.dumps({"ratings": [5] * 4}), headers={"Content-Type": "text/plain"}), 415)
    refused(client.post(path, data={"ratings": "5"}), 415)
    big = json.dumps({"ratings": [5] * 4, "pad": "x" * 70_000})
    assert "at most" in refused(client.post(path, content=big, headers=JSON), 413)
    refused(client.post(path, content=(c for c in [big.encode()]), headers=JSON), 413)  # chunked, undeclared
    refused(client.post("/api/sessions", content=b"x" * (MAX_GIVEN_BODY + 1)), 413)  # given images have 4 MB
    refused(client.post("/api/sessions", content=b"x" * 70_000), 415)


def bad_rounds(client, token: str, other: str) -> None:
    """A replay of round 0, a future round, malformed numbers, another session's round, other methods."""
    assert "already been rated" in refused(client.post(f"/api/sessions/{token}/rounds/0/ratings",
                                                       json={"ratings": [1, 1, 1, 1]}), 409)
    refused(client.post(f"/api/sessions/{token}/rounds/2/ratings", json={"ratings": [5] * 4}), 409)
    for r in ("-1", "99999999999999999999", "one", "1.0", "+1", "1e0", "%C2%B9", "%20"):
        assert "whole number" in refused(client.post(f"/api/sessions/{token}/rounds/{r}/ratings",
                                                     json={"ratings": [5] * 4}), 422)
    refused(client.post(f"/api/sessions/{other}/rounds/1/ratings", json={"ratings": [5] * 4}), 409)
    refused(client.get(f"/api/sessions/{other}/rounds/1/images/0.png"), 404)
    refused(client.post(f"/api/sessions/{token}/retry"), 409)
    refused(client.delete(f"/api/sessions/{token}"), 405)


def test_hostile_requests_change_nothing(client, manager, rated_once):
    token, other = rated_once
    before = snapshot(manager.data_dir)
    bad_tokens_and_paths(client, token)
    bad_ratings(client, f"/api/sessions/{token}/rounds/1/ratings")
    bad_rounds(client, token, other)
    assert snapshot(manager.data_dir) == before


def test_hostile_host_header_is_refused_on_a_loopback_server(manager):
    from fastapi.testclient import TestClient

    from apa.web.server import create_app, loopback_hosts

    assert loopback_hosts("0.0.0.0") is None
    with TestClient(create_app(manager, loopback_hosts("127.0.0.1")), base_url="http://127.0.0.1") as c:
        assert c.get("/").status_code == 200
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 400


def test_concurrent_submissions_for_one_round_store_one(live_server, manager):
    import httpx

    token = httpx.post(f"{live_server.url}/api/sessions").json()["token"]
    wait_phase(httpx.Client(base_url=live_server.url), token, "ready")
    before = snapshot(manager.data_dir)
    barrier, statuses = threading.Barrier(8), []

    def submit(i: int) -> None:
        with httpx.Client(base_url=live_server.url, timeout=60) as c:
            barrier.wait()
            r = c.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": [1 + i % 5] * 4})
            statuses.append((r.status_code, r.json()))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(code for code, _ in statuses)
    assert codes == [200] + [409] * 7, statuses
    after = snapshot(manager.data_dir)[token]
    assert after["spent"] == 4 and len(after["ratings"]) == 4
    assert len({x["score"] for x in after["ratings"]}) == 1  # all four from the one submission that won
    assert before[token]["ratings"] == []


def test_report_files_are_the_report_only(client, manager, rated_once):
    """Only names the report writes, only under the token's own directory; traversal and other files are 404."""
    token, other = rated_once
    root = manager.data_dir / token
    (root / "report.html").write_text("<h1>report</h1>")
    assert client.get(f"/api/sessions/{token}/report/report.html").status_code == 200
    before = snapshot(manager.data_dir)
    for name in ("session.sqlite", "config.json", "..%2fsession.sqlite", "../session.sqlite", "%2e%2e/config.json",
                 "grids/..%2f..%2fsession.sqlite", "grids/../config.json", "rounds/round_0000.safetensors",
                 "report.html%00.png", "REPORT.HTML", "/etc/passwd", "%2fetc%2fpasswd", f"..%2f{other}%2freport.html",
                 "grids/final.png", "report.md/", "x" * 60 + ".png"):
        refused(client.get(f"/api/sessions/{token}/report/{name}"), 404)
    refused(client.get(f"/api/sessions/{other}/report/report.html"), 404)  # another session has none yet
    refused(client.get(f"/api/sessions/{UNKNOWN}/report/report.html"), 404)
    refused(client.get(f"/api/sessions/{token}/final.zip"), 404)  # not done yet
    refused(client.get("/api/sessions/..%2f..%2fetc/report/report.html"), 404)
    assert snapshot(manager.data_dir) == before
