"""The `apa serve` API through FastAPI's TestClient: the happy path, resuming, and refusals."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]' torch==2.13.0")

from apa.session.core import stored_config
from apa.session import Session  # noqa: E402
from tests.web.helpers import snapshot, wait_for, wait_phase  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def start(client) -> str:
    r = client.post("/api/sessions")
    assert r.status_code == 201, r.text
    return r.json()["token"]


def rate(client, token: str, round_: int, ratings: list) -> dict:
    r = client.post(f"/api/sessions/{token}/rounds/{round_}/ratings", json={"ratings": ratings})
    assert r.status_code == 200, r.text
    return r.json()


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "script-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/style.css").status_code == 200


def test_a_whole_session(client, manager):
    token = start(client)
    assert len(token) == 43 and (manager.data_dir / token / "session.sqlite").is_file()
    state = wait_phase(client, token, "ready")
    assert (state["round"], state["images"], state["spent"], state["budget"]) == (0, 4, 0, 8)
    for p in range(4):
        img = client.get(f"/api/sessions/{token}/rounds/0/images/{p}.png")
        assert img.status_code == 200 and img.content.startswith(PNG)
    state = rate(client, token, 0, [5, 1, None, 3])
    assert state["spent"] == 3 and state["phase"] in ("queued", "fitting", "sampling", "ready")
    state = wait_phase(client, token, "ready")
    assert state["round"] == 1 and state["images"] == 4
    assert state["history"][0]["ratings"] == [5.0, 1.0, None, 3.0] and state["history"][0]["status"] == "complete"
    assert client.get(f"/api/sessions/{token}/rounds/0/grid.png").content.startswith(PNG)
    rate(client, token, 1, [2, 2, 4, 4])
    state = wait_phase(client, token, "ready")  # the skip left one rating of the budget: a round of one image
    assert (state["round"], state["images"], state["spent"]) == (2, 1, 7)
    rate(client, token, 2, [5])
    state = wait_phase(client, token, "done")
    assert state["spent"] == 8 and state["final"]
    assert client.get(f"/api/sessions/{token}/final.png").content.startswith(PNG)
    assert (manager.data_dir / token / "final_samples.npz").is_file()
    assert state["report"], "the finished page links to the report"
    page = client.get(f"/api/sessions/{token}/report/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "rated by a person" in page.text and "nan" not in page.text and "prefer" not in page.text
    assert client.get(f"/api/sessions/{token}/report/report.css").headers["content-type"].startswith("text/css")
    assert client.get(f"/api/sessions/{token}/report/grids/round_00.png").content.startswith(PNG)
    assert client.get(f"/api/sessions/{token}/report/ess.png").content.startswith(PNG)


def test_the_final_images_download_as_a_zip(client, manager):
    import io
    import zipfile

    token = start(client)
    assert client.get(f"/api/sessions/{token}/final.zip").status_code == 404  # not before the session ends
    for r in range(2):
        wait_phase(client, token, "ready")
        rate(client, token, r, [5, 1, 2, 3])
    wait_phase(client, token, "done")
    z = client.get(f"/api/sessions/{token}/final.zip")
    assert z.status_code == 200 and z.headers["content-type"] == "application/zip"
    assert "attachment" in z.headers["content-disposition"]
    names = zipfile.ZipFile(io.BytesIO(z.content)).namelist()
    assert len(names) == manager.cfg.session.eval_samples and names[0] == "final_0000.png"


def test_a_restarted_server_resumes_where_the_session_stood(client, manager, make_manager):
    from fastapi.testclient import TestClient

    from apa.web.server import create_app

    token = start(client)
    wait_phase(client, token, "ready")
    rate(client, token, 0, [4, 4, 2, 1])
    wait_phase(client, token, "ready")
    manager.close()
    with TestClient(create_app(make_manager(manager.data_dir))) as again:
        state = again.get(f"/api/sessions/{token}").json()
        assert (state["phase"], state["round"], state["spent"]) == ("ready", 1, 4)
        assert again.get(f"/api/sessions/{token}/rounds/1/images/3.png").content.startswith(PNG)


def test_a_round_rated_but_not_refitted_is_refitted_on_reopening(tmp_path, tiny_cfg, make_manager):
    data = tmp_path / "data"
    token = "A" * 43
    s = Session.start(data / token, tiny_cfg, progress=False)
    r = s.next_round()
    for p in range(4):
        s.record_all(r, [(p, 3.0)], "human")  # the server stopped before it refitted
    s.store.close()
    m = make_manager(data)
    state = wait_for(lambda: m.state(token), ("ready",))
    assert (state["round"], state["spent"]) == (1, 4)


def test_a_partly_rated_round_keeps_its_stored_ratings(tmp_path, tiny_cfg, make_manager):
    from fastapi.testclient import TestClient

    from apa.web.server import create_app

    data = tmp_path / "data"
    token = "B" * 43
    s = Session.start(data / token, tiny_cfg, progress=False)
    s.next_round()
    s.record_all(0, [(0, 5.0)], "human")
    s.record_all(0, [(2, None)], "human")
    s.store.close()
    with TestClient(create_app(make_manager(data))) as client:
        state = client.get(f"/api/sessions/{token}").json()
        assert state["phase"] == "ready" and state["rated"] == {"0": 5.0, "2": None}
        rate(client, token, 0, [1, 2, 3, 4])  # positions 0 and 2 keep what was stored
    ratings = snapshot(data)[token]["ratings"]
    assert [(x["position"], x["score"]) for x in ratings] == [(0, 5.0), (1, 2.0), (2, None), (3, 4.0)]


def test_each_session_sees_only_its_own(make_manager):
    from fastapi.testclient import TestClient

    from apa.web.server import create_app

    with TestClient(create_app(make_manager(fixed_seed=False))) as client:
        a, b = start(client), start(client)
        assert a != b
        wait_phase(client, a, "ready")
        wait_phase(client, b, "ready")
        rate(client, a, 0, [5, 5, 5, 5])
        state_b = client.get(f"/api/sessions/{b}").json()
        assert state_b["spent"] == 0 and state_b["history"][0]["ratings"] == ["pending"] * 4
        img_a = client.get(f"/api/sessions/{a}/rounds/0/images/0.png").content
        img_b = client.get(f"/api/sessions/{b}/rounds/0/images/0.png").content
        assert img_a != img_b  # each session has its own seed, and each token reads its own directory
        sessions = [client.app.state.manager.get(t).session for t in (a, b)]
        assert sessions[0].prior is sessions[1].prior  # one model in memory for every session
        assert sessions[0].store is not sessions[1].store


def test_skipping_every_image_before_any_rating_is_refused(client, manager):
    token = start(client)
    wait_phase(client, token, "ready")
    before = snapshot(manager.data_dir)
    r = client.post(f"/api/sessions/{token}/rounds/0/ratings", json={"ratings": [None] * 4})
    assert r.status_code == 422 and "at least one" in r.json()["error"]
    assert snapshot(manager.data_dir) == before


def test_cli_refuses_simulated_feedback_and_missing_weights(tmp_path, capsys):
    from apa.cli import main

    assert main(["serve", "--feedback", "oracle", "--data-dir", str(tmp_path / "d")]) == 2
    assert "apa serve collects ratings from people" in capsys.readouterr().err
    assert main(["serve", "--prior-weights", str(tmp_path / "missing.safetensors"), "--data-dir", str(tmp_path)]) == 2
    assert "no DDPM weights" in capsys.readouterr().err


def test_idle_sessions_are_closed_and_reopen_on_demand(client, manager, monkeypatch):
    import apa.web.sessions as sessions

    token = start(client)
    wait_phase(client, token, "ready")
    monkeypatch.setattr(sessions, "MAX_OPEN", 1)
    manager.handles[token].last_used -= sessions.IDLE_S + 1
    other = start(client)  # opening past MAX_OPEN closes the idle one ...
    wait_phase(client, other, "ready")
    assert token not in manager.handles
    state = rate(client, token, 0, [3, 3, 3, 3])  # ... which reopens from disk on its next request
    assert state["spent"] == 4 and token in manager.handles


def test_a_person_says_their_taste_changed(client, manager):
    """"My taste changed" while round 2 waits: stored at once (the session reopened from disk holds it),
    the refit after round 2 forgets round 1, and it is refused once no round waits."""
    token = start(client)
    wait_phase(client, token, "ready")
    rate(client, token, 0, [5, 5, 1, 1])
    state = wait_phase(client, token, "ready")
    assert state["round"] == 1 and state["taste_changed_at"] is None
    r = client.post(f"/api/sessions/{token}/taste-changed")
    assert r.status_code == 200 and r.json()["taste_changed_at"] == 2
    assert stored_config(manager.handles[token].session.store, manager.data_dir / token).session.forget_before == 2
    state = rate(client, token, 1, [1, 1, 1, 5])
    wait_phase(client, token, "done")
    refused = client.post(f"/api/sessions/{token}/taste-changed")
    assert refused.status_code == 409 and "waiting for your ratings" in refused.text
    session = manager.handles[token].session
    assert session.state.forget_point() == 1 and [len(y) for _, _, y in session.state.rated_rounds()][0] == 4
    assert session.state.training_set()[:2][1].tolist() == [-1.0, -1.0, -1.0, 1.0]


def png_of(pixels) -> bytes:
    """A grey PNG of ``pixels`` [H, W] in 0..255 (what a person's browser sends)."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_a_session_starts_from_images_the_person_gives(client, manager):
    """Two given images (one larger than the prior's 28×28, sent as a data URL) become round 0, each rated
    at the top of the scale and counted in the budget; the first round sampled is round 1, and the given
    images' particles are the prior's encoding of the images scaled to its size."""
    import base64

    import numpy as np

    bright = np.zeros((56, 56)) + 255
    bright[:, :28] = 0  # left half black, right half white
    examples = ["data:image/png;base64," + base64.b64encode(png_of(bright)).decode(),
                base64.b64encode(png_of(np.full((28, 28), 128))).decode()]
    r = client.post("/api/sessions", json={"examples": examples})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    state = wait_phase(client, token, "ready")
    assert (state["round"], state["spent"], state["images"]) == (1, 2, 4)
    assert state["history"][0]["ratings"] == [5.0, 5.0]
    session = manager.get(token).session
    assert {x["source"] for x in session.store.ratings(0)} == {"given"}
    given = session.shown_images(0)  # decoded back to [0, 1]
    assert given.shape == (2, 1, 28, 28)
    assert float(given[0, 0, :, :12].max()) < 0.05 and float(given[0, 0, :, 16:].min()) > 0.95
    assert abs(float(given[1].mean()) - 128 / 255) < 0.01


@pytest.mark.parametrize("examples, says", [
    (["data:image/png;base64," + "bm90IGFuIGltYWdl"], "cannot be read as an image"),  # "not an image"
    (["%%%"], "base64"),
    ("one image", "base64"),
])
def test_given_images_that_cannot_start_a_session_are_refused_before_anything_is_written(client, manager, examples,
                                                                                       says):
    before = snapshot(manager.data_dir)
    r = client.post("/api/sessions", json={"examples": examples})
    assert r.status_code == 422 and says in r.json()["error"], r.text
    assert snapshot(manager.data_dir) == before


def test_more_given_images_than_the_budget_leaves_room_for_are_refused(client, manager):
    import base64

    import numpy as np

    before = snapshot(manager.data_dir)
    image = base64.b64encode(png_of(np.zeros((28, 28)))).decode()
    r = client.post("/api/sessions", json={"examples": [image] * 8})  # the tiny budget is 8
    assert r.status_code == 422 and "at most 7" in r.json()["error"], r.text
    assert snapshot(manager.data_dir) == before


def test_given_images_sent_as_broken_or_deeply_nested_json_are_refused_in_one_line(client, manager):
    """The start's JSON is read as the ratings' is: 400 for JSON that cannot be read or nests past Python's
    limit (a RecursionError, not a 500), 415 for a body not sent as JSON; nothing is written."""
    before = snapshot(manager.data_dir)
    headers = {"Content-Type": "application/json"}
    assert client.post("/api/sessions", content=b"{\"examples\": [", headers=headers).status_code == 400
    deep = client.post("/api/sessions", content=b"[" * 100_000 + b"]" * 100_000, headers=headers)
    assert deep.status_code == 400 and "nests too deeply" in deep.json()["error"], deep.text
    assert client.post("/api/sessions", content=b"examples").status_code == 415
    assert snapshot(manager.data_dir) == before
