"""The PostgreSQL store: the same session as on SQLite, copies both ways, one writer, damage refused
before anything is written, and a server restart that loses nothing acknowledged."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import psycopg
import pytest
import torch

from apa.cli import build_parser
from apa.flags import config_from_args
from apa.session import Session
from apa.session.lifecycle import drive
from apa.store import SessionBusy, SessionStore, StoreError, create, open_store, read_store
from apa.store.copy import copy_session

TINY = ["--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "6", "--eval-samples", "8",
        "--epochs", "10", "--seed", "3"]


def run_session(out: Path, database: str | None) -> None:
    """The fast test session (tests/session/test_core.py's), run to its end without the report."""
    cfg = config_from_args(build_parser().parse_args(["align", *TINY]))
    session = Session.start(out, cfg, progress=False, database=database)
    try:
        drive(session)
    finally:
        session.store.close()


def view(store) -> dict:
    """What a session recorded, but for timestamps and timings: ratings, rounds, records, tensor files."""
    rows = store.rows()
    meta = {k: v for k, v in rows["meta"] if k not in ("commits", "created", "record:timings")}
    return {"ratings": [r[:5] for r in rows["ratings"]], "rounds": [r[:5] for r in rows["rounds"]],
            "meta": meta, "files": rows["files"]}


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def name() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"  # a session's name in the database is its directory's


@pytest.fixture(scope="module")
def sqlite_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sqlite") / name()
    run_session(out, None)
    return out


@pytest.fixture
def small(tmp_path, postgres):
    """A PostgreSQL session with one round and one rating."""
    s = create(tmp_path / name(), {"session": {"budget": 8}}, database=postgres.url)
    s.save_round(0, {"particles": torch.randn(4, 2), "log_weights": torch.zeros(4, dtype=torch.float64),
                     "shown": torch.tensor([2, 0])}, [2, 0], {"ess": [4.0]})
    s.add_rating(0, 0, 1.0, "oracle")
    return s


def test_a_session_on_postgres_is_the_session_on_sqlite(tmp_path, sqlite_run, postgres):
    out = tmp_path / name()
    run_session(out, postgres.url)
    on_sqlite, on_postgres = SessionStore.read(sqlite_run), read_store(out, postgres.url)
    try:
        assert view(on_postgres) == view(on_sqlite)
        assert len(on_postgres.ratings()) == 8 and [r["status"] for r in on_postgres.rounds()] == ["complete"] * 2
        assert torch.allclose(on_postgres.final_images(), on_sqlite.final_images(), atol=1e-4)
        assert not (out / "session.sqlite").exists()  # the rows are in the database alone
    finally:
        on_postgres.close()


def test_a_copy_into_postgres_and_back_is_the_same_session(tmp_path, sqlite_run, postgres):
    there, back = tmp_path / name(), tmp_path / name()
    assert "every row" in copy_session(sqlite_run, there, dst_database=postgres.url)
    assert "every row" in copy_session(there, back, src_database=postgres.url)
    original, copied, returned = SessionStore.read(sqlite_run), read_store(there, postgres.url), SessionStore.open(back)
    try:  # open: the copy back passes every check a resume makes (its ledger included)
        assert view(copied) == view(original) == view(returned)
        assert original.rows()["ratings"] == returned.rows()["ratings"]  # their timestamps too
        outputs = lambda root: {k: v for k, v in files(root).items() if not k.startswith("session.")}  # noqa: E731
        assert outputs(back) == outputs(there) == outputs(sqlite_run)  # tensors, final batch, report, config.json
        with pytest.raises(StoreError, match="already exists"):
            copy_session(sqlite_run, there, dst_database=postgres.url)
        with pytest.raises(StoreError, match="already exists"):
            copy_session(there, back, src_database=postgres.url)
    finally:
        copied.close()
        returned.close()


def test_a_second_writer_is_refused_and_readers_go_on(small, postgres):
    with pytest.raises(SessionBusy, match="in use by another apa process"):
        open_store(small.root, postgres.url)
    reader = read_store(small.root, postgres.url)
    assert reader.spent() == 1
    with pytest.raises(StoreError, match="read-only"):
        reader.add_rating(0, 1, 1.0, "oracle")
    reader.close()
    small.close()
    again = open_store(small.root, postgres.url)  # the lock went with the first writer's connection
    assert again.ratings(0)[0]["score"] == 1.0
    again.close()


def rows_of(root: Path, url: str) -> dict:
    store = read_store(root, url)
    try:
        return store.rows()
    finally:
        store.close()


@pytest.mark.parametrize("damage, match", [
    ("tensor", "round 0's tensors .* is damaged"),
    ("missing", "round 0's tensors .* is missing"),
    ("rating", "a row was deleted or changed outside apa"),
    ("round", "a row was deleted or changed outside apa"),
])
def test_damage_is_refused_before_anything_is_written(small, postgres, damage, match):
    small.close()
    root = small.root
    if damage == "tensor":
        small.round_path(0).write_bytes(small.round_path(0).read_bytes()[:-8] + b"damaged!")
    elif damage == "missing":
        small.round_path(0).unlink()
    else:
        with psycopg.connect(postgres.url, autocommit=True) as conn:
            table = "apa_ratings" if damage == "rating" else "apa_rounds"
            conn.execute(f"DELETE FROM {table} WHERE session=%s", (root.name,))
    before, on_disk = rows_of(root, postgres.url), files(root)
    with pytest.raises(StoreError, match=match) as refused:
        open_store(root, postgres.url)
    assert "\n" not in str(refused.value) and "restore" in str(refused.value).lower()
    assert rows_of(root, postgres.url) == before and files(root) == on_disk


def test_a_tensor_file_without_its_row_is_refused(small, postgres):
    """A round's tensors on disk that the database does not name (beyond the next round's, which a crash
    between the file and its row leaves) mean rows were lost."""
    small.complete_round(0, None, None, {})
    small.close()
    (small.root / "rounds" / "round_0005.safetensors").write_bytes(small.round_path(0).read_bytes())
    with pytest.raises(StoreError, match="round 5's tensors .* no row"):
        open_store(small.root, postgres.url)


def test_a_restart_of_postgres_loses_nothing_acknowledged(small, postgres):
    small.add_rating(0, 1, -1.0, "oracle")  # acknowledged before the restart
    postgres.restart()
    small.complete_round(0, 0.25, {"w": torch.ones(3)}, {"eval": {"a": 1}})  # reconnects, re-locks, re-checks
    small.save_round(1, {"particles": torch.randn(4, 2), "log_weights": torch.zeros(4, dtype=torch.float64),
                         "shown": torch.tensor([1, 3])}, [1, 3], {})
    postgres.restart()
    assert small.ratings(0)[1]["score"] == -1.0  # a read reconnects too
    small.add_ratings(1, [(0, 2.0), (1, None)], "oracle")
    with pytest.raises(SessionBusy):  # the lock was taken again on the new connection
        open_store(small.root, postgres.url)
    small.close()
    store = open_store(small.root, postgres.url)  # checked whole: the ledger agrees with every row
    try:
        assert [(r["round"], r["position"], r["score"]) for r in store.ratings()] == [
            (0, 0, 1.0), (0, 1, -1.0), (1, 0, 2.0), (1, 1, None)]
        assert [r["status"] for r in store.rounds()] == ["complete", "sampled"] and store.spent() == 3
        assert torch.equal(store.load_surrogate(0)["w"], torch.ones(3))
    finally:
        store.close()


def losing(store, *, lands: bool, times: int = 1):
    """``store``'s write transaction, with its connection lost the first ``times`` times: after the commit
    landed (``lands``: only its acknowledgement is lost) or before it. Returns the list of attempts."""
    real, attempts = store._transaction, []

    def transaction(body, files, counted, ledger=True):
        attempts.append(1)
        if len(attempts) <= times:
            if lands:
                real(body, files, counted, ledger)
            store._conn.close()
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        return real(body, files, counted, ledger)

    return transaction, attempts


@pytest.mark.parametrize("lands", [True, False], ids=["landed", "not-landed"])
def test_a_commit_in_flight_when_the_connection_is_lost_is_confirmed_by_the_count_of_commits(
        small, postgres, monkeypatch, lands):
    """The connection is lost around a rating's commit: after it landed (the acknowledgement lost) or before.
    After reconnecting, the count of commits says which: a landed write is acknowledged without running it
    again, the other is run once more. Either way the rating is stored once and the session reopens checked.
    Detects a store that runs a landed write twice, or acknowledges one that never landed."""
    transaction, attempts = losing(small, lands=lands)
    monkeypatch.setattr(small, "_transaction", transaction)
    before = small._commits()
    small.add_rating(0, 1, -1.0, "oracle")
    assert len(attempts) == (1 if lands else 2) and small._commits() == before + 1
    assert [(r["position"], r["score"]) for r in small.ratings(0)] == [(0, 1.0), (1, -1.0)]
    small.close()
    open_store(small.root, postgres.url).close()  # the ledger agrees with every row


def test_a_write_lost_twice_before_its_commit_is_not_acknowledged(small, postgres, monkeypatch):
    transaction, attempts = losing(small, lands=False, times=2)
    monkeypatch.setattr(small, "_transaction", transaction)
    with pytest.raises(StoreError, match="could not be confirmed; it was not acknowledged"):
        small.add_rating(0, 1, -1.0, "oracle")
    assert len(attempts) == 2 and [r["position"] for r in small.ratings(0)] == [0]


def test_bad_urls_say_what_to_do(tmp_path):
    with pytest.raises(StoreError, match="not a PostgreSQL URL"):
        create(tmp_path / "s", {}, database="mysql://localhost/apa")
    with pytest.raises(StoreError, match="cannot reach the database .* check the URL"):
        open_store(tmp_path / "s", "postgresql://nobody@127.0.0.1:1/apa")
    assert not (tmp_path / "s").exists()
