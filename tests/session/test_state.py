"""SessionState alone, on a store written by hand (no prior, no sampler): what a session remembers.

Each test would catch a query that reads the wrong round, scale or change of taste: the answers are
small enough to write out."""

import torch

from apa.config import AlignConfig
from apa.session import with_overrides
from apa.session.state import SessionState, Timings, normalise_scores
from apa.store import SessionStore


def _store(tmp_path, rounds: list[list[float | None]]) -> SessionStore:
    """One round per list of ratings (on the 1..5 scale), each round 4 particles [4, 2], all shown."""
    store = SessionStore.create(tmp_path / "s", AlignConfig().to_dict())
    for r, ratings in enumerate(rounds):
        particles = torch.arange(8, dtype=torch.float32).reshape(4, 2) + 10 * r
        store.save_round(r, {"particles": particles, "log_weights": torch.zeros(4), "shown": torch.arange(4)},
                         [0, 1, 2, 3], {})
        store.add_ratings(r, list(enumerate(ratings)), "test")
        store.complete_round(r, None, None, {})
    return store


def test_the_training_set_maps_ratings_onto_minus_one_to_one_and_skips_none(tmp_path):
    store = _store(tmp_path, [[1.0, 5.0, None, 3.0]])
    state = SessionState(store, AlignConfig(), (1.0, 5.0), (2,))
    x, y, w = state.training_set()
    assert y.tolist() == [-1.0, 1.0, 0.0] and w is None
    assert torch.equal(x, torch.tensor([[0.0, 1.0], [2.0, 3.0], [6.0, 7.0]]))  # particle 2 was skipped
    assert state.liked_shares() == [1 / 3]  # one of three ratings above the midpoint 3
    store.close()


def test_a_named_change_of_taste_forgets_the_rounds_before_it(tmp_path):
    store = _store(tmp_path, [[5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 1.0], [5.0, 1.0, 5.0, 1.0]])
    cfg = with_overrides(AlignConfig(), session={"forget_before": 2})  # numbered from 1: round index 1
    state = SessionState(store, cfg, (1.0, 5.0), (2,))
    assert state.changes() == [1] and state.forget_point() == 1
    x, y, _ = state.training_set()
    assert len(y) == 8 and x[:, 0].min() >= 10  # rounds 1 and 2 only
    store.close()


def test_window_and_discount_cut_and_weigh_by_age(tmp_path):
    store = _store(tmp_path, [[5.0] * 4, [1.0] * 4, [5.0] * 4])
    cfg = with_overrides(AlignConfig(), surrogate={"window": 6, "discount": 0.5})
    x, y, w = SessionState(store, cfg, (1.0, 5.0), (2,)).training_set()
    assert len(y) == 6 and w.tolist() == [0.5, 0.5, 1.0, 1.0, 1.0, 1.0]  # the last 6: 2 of round 1, 4 of round 2
    store.close()


def test_history_is_every_shown_particle_in_round_order(tmp_path):
    store = _store(tmp_path, [[1.0] * 4, [1.0] * 4])
    state = SessionState(store, AlignConfig(), (1.0, 5.0), (2,))
    assert state.history_particles().shape == (8, 2) and state.history_particles()[4, 0] == 10.0
    store.close()


def test_normalise_scores_and_timings():
    assert normalise_scores(torch.tensor([1.0, 3.0, 5.0]), (1.0, 5.0)).tolist() == [-1.0, 0.0, 1.0]
    t = Timings({"sampling": 1.0})
    with t.timer("sampling"):
        pass
    assert t["sampling"] >= 1.0 and t["fit"] == 0.0
