"""next_action over every state a session's store can be in, crash states included.

Each state is made with the real store and session steps, then read back by ``next_action``
alone: a lifecycle that resumed at the wrong step (refitting twice, sampling over an open round,
finishing with budget left) fails here."""

import torch

from apa.config import preset
from apa.session.lifecycle import DONE, FINAL, FIT, RATE, SAMPLE, Action, drive, next_action
from apa.session import Session, with_overrides

CFG = with_overrides(preset("default"), sampler={"particles": 8, "steps": 4}, surrogate={"epochs": 5},
                     session={"budget": 8, "per_round": 4, "eval_samples": 8, "seed": 1})


def test_every_state_of_a_session_names_its_next_step(tmp_path):
    s = Session.start(tmp_path / "s", CFG, progress=False)
    at = lambda: next_action(s.store, s.cfg.session.budget)  # noqa: E731
    assert at() == Action(SAMPLE, 0)  # a new session
    s.sample_round(0)
    assert at() == Action(RATE, 0)  # shown, nothing rated
    k = len(s.store.rounds()[0]["shown"])
    s.record_all(0, [(0, 1.0)], "test")
    assert at() == Action(RATE, 0)  # a crash in the middle of a round's ratings
    s.record_all(0, [(p, -1.0) for p in range(1, k)], "test")
    assert at() == Action(FIT, 0)  # rated, the refit not yet stored
    s.finish_round(0)
    assert at() == Action(SAMPLE, 1)  # budget left
    s.sample_round(1)
    s.record_all(1, [(p, None) for p in range(len(s.store.rounds()[1]["shown"]))], "test")
    assert at() == Action(FIT, 1)  # a round of skips is complete too, and costs nothing
    s.finish_round(1)
    assert s.store.spent() == k and at() == Action(SAMPLE, 2)
    drive(s, until=FINAL)  # the simulated user spends the rest
    assert s.store.spent() == 8 and at() == Action(FINAL)
    s.store.save_final(s.final_samples())
    assert at() == Action(DONE)
    s.store.extend_budget(12)  # a budget raised after the end samples again
    assert next_action(s.store, 12) == Action(SAMPLE, len(s.store.rounds()))
    s.store.close()


def test_a_resumed_session_continues_with_the_interrupted_step(tmp_path):
    """Stopped after a round's ratings but before its refit, the reopened session refits that round
    once (the next step is FIT, not another SAMPLE) and ends where an uninterrupted one ends."""
    whole = Session.start(tmp_path / "whole", CFG, progress=False)
    drive(whole, until=FINAL)
    cut = Session.start(tmp_path / "cut", CFG, progress=False)
    cut.sample_round(0)
    cut.answer(0)
    cut.store.close()
    again = Session.resume(tmp_path / "cut", progress=False)
    assert next_action(again.store, 8) == Action(FIT, 0)
    drive(again, until=FINAL)
    ratings = lambda s: [(x["round"], x["position"], x["score"]) for x in s.store.ratings()]  # noqa: E731
    assert ratings(again) == ratings(whole)
    for a, b in zip(whole.store.rounds(), again.store.rounds()):
        wa, wb = whole.store.load_surrogate(a["round"]), again.store.load_surrogate(b["round"])
        assert all(torch.equal(wa[n], wb[n]) for n in wa)
    whole.store.close()
    again.store.close()
