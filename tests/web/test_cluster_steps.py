"""The cluster's ingress and engine logic in one process, with no Ray cluster: ``ClusterSessions`` over SQLite
stores, its engine handle answering from a ``Steps`` in this process (what Ray's handle returns, the
engine's own answer). A background step that fails shows the "error" phase with the failure's one line,
keeps every rating, and Retry takes the step again."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed: pip install 'apa[cluster]'")
pytest.importorskip("fastapi", reason="the web extra is not installed: pip install -e '.[web]' torch==2.13.0")

from apa.web import cluster  # noqa: E402
from tests.web.helpers import WAIT_S  # noqa: E402


class Answered:
    """What ``handle.method.remote(...)`` returns: its ``result()`` is the engine's answer."""

    def __init__(self, answer):
        self.answer = answer

    def result(self, timeout_s: float | None = None):
        return self.answer


class InProcess:
    """An engine handle whose ``advance.remote(token).result()`` is ``Steps.advance(token)``, run here."""

    def __init__(self, steps: cluster.Steps):
        self.steps, self.advance = steps, self

    def remote(self, token: str) -> Answered:
        return Answered(self.steps.advance(token))


def settle(sessions, token: str, *phases: str) -> dict:
    """Poll the ingress's view of the session until its phase is one of ``phases`` and the engine's step
    has returned (a round is shown as soon as it is stored, while the step still holds the session's lock
    until it closes the store: a submit then is refused as busy, which the page retries)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        state = sessions.state(token)
        if state["phase"] in phases and sessions.advancer.since(token) is None:
            return state
        assert time.monotonic() < deadline, f"still {state['phase']} after {WAIT_S} s (waiting for {phases})"
        time.sleep(0.05)


def test_a_failed_engine_step_shows_the_error_phase_keeps_the_ratings_and_retries(tmp_path, tiny_cfg, monkeypatch):
    settings = {"config": tiny_cfg.to_dict(), "data_dir": str(tmp_path / "sessions"), "database": None,
                "fixed_seed": True, "max_sessions": 4, "prior_window": 0.0}
    sessions = cluster.ClusterSessions(settings, InProcess(cluster.Steps(settings)))
    token = sessions.create()
    assert settle(sessions, token, "ready")["round"] == 0

    def broken(session, answers=True):
        raise RuntimeError("the accelerator fell over")

    monkeypatch.setattr(cluster, "drive", broken)
    sessions.submit(token, 0, {"ratings": [5, 1, None, 4]})
    state = settle(sessions, token, "error")
    assert state["message"].startswith("RuntimeError: the accelerator fell over. Everything rated so far is saved")
    assert state["spent"] == 3 and state["history"][0]["ratings"] == [5.0, 1.0, None, 4.0]
    assert sessions.state(token)["phase"] == "error"  # shown, and not asked for again, until Retry

    monkeypatch.undo()
    sessions.retry(token)
    state = settle(sessions, token, "ready")
    assert (state["round"], state["spent"], state["message"]) == (1, 3, "")
