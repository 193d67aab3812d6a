import hashlib
import math

import pytest
import torch

from apa.store import RatingRefused, SessionStore, StoreError


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def store(tmp_path):
    s = SessionStore.create(tmp_path / "s", {"hello": 1})
    s.save_round(0, {"particles": torch.randn(4, 2), "log_weights": torch.zeros(4, dtype=torch.float64),
                     "shown": torch.tensor([2, 0])}, [2, 0], {"ess": [4.0]})
    return s


def test_round_trip(store):
    assert store.config() == {"hello": 1}
    store.add_rating(0, 0, 1.0, "oracle")
    store.add_rating(0, 1, None, "human")
    assert [(x["particle"], x["score"]) for x in store.ratings(0)] == [(2, 1.0), (0, None)]
    assert store.spent() == 1
    store.complete_round(0, 0.5, {"w": torch.ones(3)}, {"eval": {"a": 1}})
    row = store.rounds()[0]
    assert row["status"] == "complete" and row["fit_loss"] == 0.5 and row["info"] == {"ess": [4.0], "eval": {"a": 1}}
    assert torch.equal(store.load_surrogate(0)["w"], torch.ones(3))
    assert SessionStore.read(store.root).ratings() == store.ratings()
    expected = store.ratings()
    store.close()
    assert SessionStore.open(store.root).ratings() == expected


@pytest.mark.parametrize("args, match", [((0, 0, math.nan), "finite"), ((0, 5, 1.0), "no image 5"),
                                         ((3, 0, 1.0), "does not exist")])
def test_bad_ratings_are_refused_and_nothing_changes(store, args, match):
    store.add_rating(0, 1, -1.0, "oracle")
    before = store.ratings()
    with pytest.raises(RatingRefused, match=match):
        store.add_rating(*args, "oracle")
    assert store.ratings() == before


def test_duplicate_and_late_ratings_are_refused(store):
    store.add_rating(0, 0, 1.0, "oracle")
    with pytest.raises(RatingRefused, match="already rated"):
        store.add_rating(0, 0, -1.0, "oracle")
    store.complete_round(0, None, None, {})
    with pytest.raises(RatingRefused, match="already complete"):
        store.add_rating(0, 1, 1.0, "oracle")
    assert store.ratings(0)[0]["score"] == 1.0


def test_create_refuses_a_non_empty_directory(tmp_path, store):
    with pytest.raises(StoreError, match="--resume"):
        SessionStore.create(store.root, {})
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="empty or new"):
        SessionStore.create(other, {})
    assert (other / "notes.txt").read_text() == "mine"


def test_open_refuses_foreign_and_damaged_directories(tmp_path, store):
    with pytest.raises(StoreError, match="not an apa session"):
        SessionStore.open(tmp_path)
    db = store.root / "session.sqlite"
    store.close()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "session.sqlite").write_bytes(b"this is not sqlite" * 100)
    digest = _digest(damaged / "session.sqlite")
    with pytest.raises(StoreError, match="damaged"):
        SessionStore.open(damaged)
    assert _digest(damaged / "session.sqlite") == digest
    assert SessionStore.open(store.root).rounds()  # the good one still opens (closed: its lock is free)
    assert db.exists()


def test_damaged_round_tensors_name_the_file(store):
    store.round_path(0).write_bytes(b"garbage")
    with pytest.raises(StoreError, match="round_0000"):
        SessionStore.read(store.root).round_tensors(0)  # any process that reads the file


def test_a_round_written_in_this_process_is_served_from_memory(store):
    """Round tensors are the channel between a round's steps without a read back from disk: the
    store that wrote them returns equal tensors, in a fresh dict each call."""
    first = store.round_tensors(0)
    store.round_path(0).write_bytes(b"garbage")  # not read again by this store
    again = store.round_tensors(0)
    assert torch.equal(first["particles"], again["particles"]) and again["shown"].tolist() == [2, 0]
    first["particles"] = torch.zeros(1)
    assert store.round_tensors(0)["particles"].shape == (4, 2)


def test_one_writer_at_a_time_and_readers_meanwhile(store):
    import os

    from apa.store import SessionBusy

    store.add_rating(0, 0, 1.0, "oracle")
    with pytest.raises(SessionBusy, match=f"pid {os.getpid()}"):
        SessionStore.open(store.root)
    assert SessionStore.read(store.root).spent() == 1
    store.close()
    SessionStore.open(store.root).close()


def test_crashed_creations_are_swept_and_live_ones_kept(tmp_path):
    from apa.store import lock_new, sweep_partials

    crashed, live, bare = (tmp_path / f".s.apa-new-{x}" for x in ("dead", "live", "bare"))
    for d in (crashed, live, bare):
        d.mkdir()
    lock_new(crashed).close()  # its process died: the lock is free
    held = lock_new(live)
    sweep_partials(tmp_path)
    assert not crashed.exists() and live.exists() and bare.exists()  # bare: its creator has not locked it yet
    held.close()
