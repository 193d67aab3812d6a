"""The durable record of a session in PostgreSQL, for many machines: the rows in one database, the
tensors in a directory every replica can reach.

A session is a database URL and a directory (its ``root``); its name in the database is the
directory's name. One schema serves every session (tables keyed by the session's name, created if
missing): ``apa_meta``, ``apa_rounds``, ``apa_ratings`` (with ``seq``, the commit order),
``apa_files`` (each tensor file's sha256) and ``apa_ledgers`` (the session's tally, see
``apa.store.base``: counts, the running sha256 of the ratings, a sha256 of every row). The
directory holds rounds/*.safetensors, surrogate/*.safetensors, config.json (for people), the final
batch and the report.

Guarantees, as for the SQLite store:
- every write is one transaction, committed (``synchronous_commit`` as the server has it: on by
  default) before the call returns; a tensor file is written atomically and fsync'ed before the
  row that names it; a change of the configuration updates the database and config.json together;
- one writer per session: ``pg_try_advisory_lock`` on a key derived from the session's name, held
  on the store's own connection for its lifetime; a second writer gets SessionBusy;
- opening for writing checks the session whole before anything is written: its rows against its
  ledger (a row deleted or changed outside apa is refused), every tensor file against its sha256,
  and no tensor file on disk without its row (other than the one a crash between writing a round's
  tensors and committing its row can leave);
- the connection lost (PostgreSQL restarted): the store reconnects within RECONNECT_S, takes the
  lock again and checks the session again, then retries. A write whose commit was in flight is
  confirmed by the count of commits: landed (acknowledged), not landed (run again), or anything
  else (StoreError: not acknowledged).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import torch

from apa.atomic import place, stage_file, write_file
from apa.store.base import (CONFIG_NAME, FITTED, FORMAT, SAMPLED, STATE_TABLES, DatabaseUnavailable, StoreBase,
                            RatingRefused, SessionBusy, StoreError, describe, disk_errors, failpoint, file_problems,
                            public, rating_chain, round_rows, round_name, state_hash, surrogate_name, tensor_files)

try:
    import psycopg
except ImportError as e:  # an optional dependency
    raise StoreError("a session stored in PostgreSQL needs psycopg: pip install 'apa[cluster]'") from e

SCHEMA = """
CREATE TABLE IF NOT EXISTS apa_meta (
  session TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (session, key));
CREATE TABLE IF NOT EXISTS apa_rounds (
  session TEXT NOT NULL, round INTEGER NOT NULL, status TEXT NOT NULL, shown TEXT NOT NULL,
  fit_loss DOUBLE PRECISION, info TEXT NOT NULL DEFAULT '{}', created DOUBLE PRECISION NOT NULL,
  PRIMARY KEY (session, round));
CREATE TABLE IF NOT EXISTS apa_ratings (
  session TEXT NOT NULL, round INTEGER NOT NULL, position INTEGER NOT NULL, particle INTEGER NOT NULL,
  score DOUBLE PRECISION, source TEXT NOT NULL, created DOUBLE PRECISION NOT NULL, seq BIGSERIAL NOT NULL,
  PRIMARY KEY (session, round, position));
CREATE TABLE IF NOT EXISTS apa_files (
  session TEXT NOT NULL, name TEXT NOT NULL, sha256 TEXT NOT NULL, PRIMARY KEY (session, name));
CREATE TABLE IF NOT EXISTS apa_ledgers (session TEXT PRIMARY KEY, ledger TEXT NOT NULL);
"""
# Each table's columns as the SQLite store has them, and its key order ("C": byte order, as SQLite's).
COLUMNS = {"meta": "key, value", "rounds": "round, status, shown, fit_loss, info, created",
           "ratings": "round, position, particle, score, source, created", "files": "name, sha256"}
ORDER = {"meta": 'key COLLATE "C"', "rounds": "round", "ratings": "round, position", "files": 'name COLLATE "C"'}
assert ORDER.keys() == STATE_TABLES.keys() == COLUMNS.keys()
SCHEMA_LOCK = 0x6170615F736368  # the advisory lock held while the schema is created ("apa_sch")
RECONNECT_S = 10.0  # how long a lost connection is tried again before the write or read fails
CONNECT_TIMEOUT_S = 3


def redacted(url: str) -> str:
    """The URL without its password (for messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


def check_url(url: str) -> None:
    """Refuse anything but a postgresql:// (or postgres://) URL, with an example of one."""
    if urlsplit(url).scheme not in ("postgresql", "postgres"):
        raise StoreError(f"--database {redacted(url)!r} is not a PostgreSQL URL; give one like "
                         "postgresql://user@host:5432/dbname")


def connect(url: str) -> "psycopg.Connection":
    """A connection in autocommit mode (transactions are explicit); StoreError naming the database if
    it cannot be reached or the URL cannot be read."""
    check_url(url)
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.ProgrammingError as e:
        raise StoreError(f"--database {redacted(url)!r} cannot be read ({_first_line(e)}); give one like "
                         "postgresql://user@host:5432/dbname") from e
    except psycopg.OperationalError as e:
        raise DatabaseUnavailable(f"cannot reach the database {redacted(url)} ({_first_line(e)}); check the URL "
                                  "and that PostgreSQL is running") from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def ensure_schema(conn: "psycopg.Connection") -> None:
    """The tables, created if missing (one creator at a time: concurrent CREATE IF NOT EXISTS can collide)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
        conn.execute(SCHEMA)


def lock_key(name: str) -> int:
    """The advisory lock key of a session: the first 8 bytes of sha256("apa-session:" + name), signed."""
    return int.from_bytes(hashlib.sha256(f"apa-session:{name}".encode()).digest()[:8], "big", signed=True)


def lost(conn: "psycopg.Connection", e: BaseException) -> bool:
    """Whether an error is the connection's loss (the server restarted or went away), not a refusal."""
    return isinstance(e, psycopg.OperationalError) and (conn.closed or conn.broken)


class PostgresStore(StoreBase):
    """A session's store in PostgreSQL (see the module's docstring); the same methods as ``SessionStore``."""

    def __init__(self, url: str, root: Path, conn: "psycopg.Connection", writable: bool):
        self.url, self.root, self.name = url, Path(root), Path(root).name
        self._conn = conn
        self._writable = writable  # holds the session's advisory lock on ``_conn``
        self._lock = threading.RLock()  # one statement or transaction at a time on the connection
        self._rounds: dict[int, dict[str, torch.Tensor]] = {}  # round tensors written or read (they never change)

    # ------------------------------------------------------------ opening

    @classmethod
    def create(cls, url: str, root: Path, config: dict[str, Any], kind: str = "fkc") -> "PostgresStore":
        """A new session named after ``root`` (a missing or empty directory, made 0700 here), its rows
        in the database; refused if the database holds a session of that name. Nothing is left
        behind if it fails: the rows are one transaction, the directory is removed again."""
        root = Path(root)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise StoreError(f"{root} is not an empty directory; choose an empty or new directory for the session")
        conn = connect(url)
        store = cls(url, root, conn, writable=True)
        made = not root.exists()
        try:
            ensure_schema(conn)
            store._take_lock()
            if store._exists(conn):
                raise StoreError(f"the database {redacted(url)} already holds a session named {store.name!r}; "
                                 "continue it with --resume, or choose another directory name")
            with disk_errors(root, "create the session", created=False):
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
                stamp = str(time.time())
                store._commit("create the session", lambda conn: conn.cursor().executemany(
                    "INSERT INTO apa_meta VALUES (%s, %s, %s)",
                    [(store.name, k, v) for k, v in (("format", FORMAT), ("config", json.dumps(config)),
                                                      ("created", stamp), ("kind", kind))]),
                    {CONFIG_NAME: json.dumps(config, indent=2).encode()}, counted=False)
            return store
        except BaseException:
            conn.close()
            if made and root.is_dir() and not any(root.iterdir()):
                root.rmdir()
            raise

    @classmethod
    def open(cls, url: str, root: Path) -> "PostgresStore":
        """An existing session for writing (one process at a time, held by the database), checked
        whole (``check``) before anything is written; refused without any change if it is not."""
        store = cls(url, Path(root), connect(url), writable=True)
        try:
            store._take_lock()
            store.check()
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def read(cls, url: str, root: Path) -> "PostgresStore":
        """An existing session, read-only and without its lock (tensor files are still checked when read)."""
        store = cls(url, Path(root), connect(url), writable=False)
        try:
            if not store._exists(store._conn):
                raise StoreError(f"the database {redacted(url)} holds no session named {store.name!r}")
        except BaseException:
            store.close()
            raise
        return store

    @classmethod
    def exists(cls, url: str, root: Path) -> bool:
        """Whether the database holds a session named after ``root``."""
        conn = connect(url)
        try:
            return cls(url, Path(root), conn, writable=False)._exists(conn)
        finally:
            conn.close()

    @classmethod
    def repair(cls, url: str, root: Path) -> str:
        """Check everything ``open`` checks and mend what needs no guess: temporary files a failed write
        left and a config.json that disagrees with the database. A PostgreSQL session has no ledger
        file to lose; anything else wrong is refused by the check, and then nothing is changed."""
        store = cls.open(url, root)
        try:
            done = []
            leftovers = sorted(p for d in (store.root, *(store.root / x for x in ("rounds", "surrogate")))
                               for p in d.glob("*.tmp"))
            for path in leftovers:
                path.unlink(missing_ok=True)
                done.append(f"removed {path.relative_to(store.root)}")
            try:
                stale = json.loads((store.root / CONFIG_NAME).read_text()) != store.config()
            except (OSError, ValueError):
                stale = True
            if stale:
                with disk_errors(store.root, "rewrite config.json"):
                    write_file(store.root / CONFIG_NAME, json.dumps(store.config(), indent=2).encode())
                done.append(f"rewrote {CONFIG_NAME} from the database")
            n = len(store.ratings())
            return (f"{store.root} ({redacted(url)}): everything checked ({n} ratings, {len(store.rounds())} rounds, "
                    f"every tensor file, the ledger); " + ("; ".join(done) if done else "nothing to repair"))
        finally:
            store.close()

    def _exists(self, conn: "psycopg.Connection") -> bool:
        if conn.execute("SELECT to_regclass('apa_ledgers')").fetchone()[0] is None:
            return False
        return conn.execute("SELECT 1 FROM apa_ledgers WHERE session=%s", (self.name,)).fetchone() is not None

    def _take_lock(self) -> None:
        """Hold the session's advisory lock on this store's connection, or SessionBusy."""
        held = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_key(self.name),)).fetchone()[0]
        if not held:
            raise SessionBusy(f"the session {self.name!r} in {redacted(self.url)} is in use by another apa process "
                              "(it holds the session's lock in the database); wait for it to finish or stop it, "
                              "then try again")

    # ------------------------------------------------------------ checks

    def tally(self, conn: "psycopg.Connection") -> dict[str, Any]:
        """The session's ledger as its rows stand (see ``apa.store.sqlite.tally``: the same digests of the
        same rows), ``files`` (name -> sha256) and ``format``."""
        q = lambda sql: conn.execute(sql, (self.name,)).fetchall()  # noqa: E731
        prefixes = rating_chain(q("SELECT round, position, particle, score, source FROM apa_ratings "
                                  "WHERE session=%s ORDER BY seq"))
        meta = dict(q("SELECT key, value FROM apa_meta WHERE session=%s"))
        state = state_hash((t, q(f"SELECT {COLUMNS[t]} FROM apa_{t} WHERE session=%s ORDER BY {ORDER[t]}"))
                           for t in STATE_TABLES)
        return {"rounds": q("SELECT count(*) FROM apa_rounds WHERE session=%s")[0][0], "ratings": len(prefixes) - 1,
                "chain": prefixes[-1], "commits": int(meta.get("commits", 0)), "state": state,
                "files": dict(q("SELECT name, sha256 FROM apa_files WHERE session=%s")), "format": meta.get("format")}

    def check(self) -> None:
        """Refuse a damaged session, naming what is wrong and what to do: not in the database, not of
        this format, rows that differ from its ledger, a tensor file missing or whose sha256 differs, a
        tensor file on disk whose row is missing."""
        where = f"the session {self.name!r} in {redacted(self.url)}"
        with self._lock:
            row = self._conn.execute("SELECT ledger FROM apa_ledgers WHERE session=%s", (self.name,)).fetchone() \
                if self._conn.execute("SELECT to_regclass('apa_ledgers')").fetchone()[0] else None
            if row is None:
                raise StoreError(f"the database {redacted(self.url)} holds no session named {self.name!r}; start one "
                                 f"with `apa align --database URL --out {self.root}`")
            found = self.tally(self._conn)
        if found["format"] != FORMAT:
            raise StoreError(f"{where} has format {found['format']!r}, expected {FORMAT!r}; it was left untouched")
        if public(found) != json.loads(row[0]):
            raise StoreError(f"{where} holds {found['ratings']} ratings and {found['rounds']} rounds whose rows differ "
                             "from its ledger: a row was deleted or changed outside apa. It was left untouched; "
                             "restore the database from a backup")
        problems = file_problems(self.root, found["files"]) + self._orphans(found)
        if problems:
            raise StoreError(f"{where}: {problems[0]} (in {self.root}); the session was left untouched. Restore the "
                             "directory or the database from a backup")

    def _orphans(self, found: dict[str, Any]) -> list[str]:
        """Tensor files on disk that the database does not name, but for the one a crash between writing
        them and committing their row may leave (the next round's, the open round's surrogate)."""
        rounds = self.rounds()
        allowed = {round_name(len(rounds))} | ({surrogate_name(rounds[-1]["round"])}
                                               if rounds and rounds[-1]["status"] != FITTED else set())
        return [f"{describe(n)} ({n}) is on disk but the database has no row for it (a row was lost)"
                for n in sorted(tensor_files(self.root) - set(found["files"]) - allowed)]

    # ------------------------------------------------------------ statements

    def _reconnect(self, cause: BaseException) -> None:
        """A new connection after the old one was lost, tried for RECONNECT_S; a writer takes its lock
        again and checks the session again before anything more is read or written."""
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
                break
            except psycopg.OperationalError as e:
                if time.monotonic() > deadline:
                    raise DatabaseUnavailable(
                        f"lost the connection to the database {redacted(self.url)} ({_first_line(cause)}) and could "
                        f"not reconnect within {RECONNECT_S:.0f} s ({_first_line(e)}); nothing unconfirmed was "
                        f"acknowledged. Once PostgreSQL is back, continue with --resume {self.root}") from e
                time.sleep(0.2)
        self._conn.close()
        self._conn = conn
        if self._writable:
            self._take_lock()
            self.check()

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """The rows of one read, run again on a new connection if the old one was lost."""
        with self._lock:
            try:
                return self._conn.execute(sql, params).fetchall()
            except psycopg.OperationalError as e:
                if not lost(self._conn, e):
                    raise StoreError(f"the database {redacted(self.url)} refused a read ({_first_line(e)})") from e
                self._reconnect(e)
                return self._conn.execute(sql, params).fetchall()

    def _commit(self, what: str, body: Callable[[Any], None], files: dict[str, bytes] | None = None,
                counted: bool = True) -> None:
        """One write transaction: ``body(connection)``, the count of commits (meta "commits") and the
        ledger, all or nothing, and ``files`` (name -> bytes, written below the root) staged before
        the commit and placed after it. A refusal inside rolls everything back. If the connection is
        lost, the write is confirmed after reconnecting: by the count of commits it landed (done), or
        did not (run again once), else StoreError and the write is not acknowledged."""
        with self._lock:
            if not self._writable:
                raise StoreError(f"{self.root} was opened read-only; open it with PostgresStore.open to write")
            before = self._commits() if counted else None
            for attempt in range(2):
                try:
                    self._transaction(body, files, counted)
                    break
                except psycopg.OperationalError as e:
                    if not lost(self._conn, e):
                        raise StoreError(f"could not {what} in {redacted(self.url)} ({_first_line(e)})") from e
                    self._reconnect(e)
                    if self._landed(what, before, attempt):
                        if files:
                            with disk_errors(self.root, what):
                                for name, data in files.items():
                                    write_file(self.root / name, data)
                        break
                except psycopg.errors.Error as e:
                    raise StoreError(f"could not {what} in {redacted(self.url)} ({_first_line(e)})") from e
            failpoint(what)

    def _landed(self, what: str, before: int | None, attempt: int) -> bool:
        """After a reconnect: whether the write whose commit was in flight landed (the count of commits
        is one more), or did not (the same: run it again, once); StoreError otherwise."""
        now = self._commits() if before is not None else None
        if before is not None and now == before + 1:
            return True
        if now == before and attempt == 0:
            return False
        raise StoreError(f"could not {what} in {redacted(self.url)}: the connection was lost and the write could not "
                         "be confirmed; it was not acknowledged. Continue with --resume, which re-checks the session")

    def _commits(self) -> int:
        rows = self._query("SELECT value FROM apa_meta WHERE session=%s AND key='commits'", (self.name,))
        return int(rows[0][0]) if rows else 0

    def _transaction(self, body: Callable[[Any], None], files: dict[str, bytes] | None, counted: bool,
                     ledger: bool = True) -> None:
        staged: dict[Path, Path] = {}
        try:
            with self._conn.transaction():
                body(self._conn)
                if counted:
                    self._conn.execute("INSERT INTO apa_meta VALUES (%s, 'commits', '1') ON CONFLICT (session, key) "
                                       "DO UPDATE SET value = (apa_meta.value::bigint + 1)::text", (self.name,))
                if ledger:
                    self._conn.execute("INSERT INTO apa_ledgers VALUES (%s, %s) ON CONFLICT (session) DO UPDATE "
                                       "SET ledger = excluded.ledger",
                                       (self.name, json.dumps(public(self.tally(self._conn)))))
                with disk_errors(self.root, "stage a file", retry=True):
                    for name, data in (files or {}).items():
                        staged[self.root / name] = stage_file(self.root / name, data)
        except BaseException:
            for tmp in staged.values():
                tmp.unlink(missing_ok=True)
            raise
        for path, tmp in staged.items():
            place(tmp, path)

    # ------------------------------------------------------------ meta

    def _meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM apa_meta WHERE session=%s AND key=%s", (self.name, key))
        return rows[0][0] if rows else None

    def config(self) -> dict[str, Any]:
        return json.loads(self._meta("config"))

    def kind(self) -> str:
        """Which loop made the session: "fkc" (`apa align`) or a baseline's ("guidance")."""
        return self._meta("kind") or "fkc"

    # ------------------------------------------------------------ rounds

    def _record_file(self, conn: Any, path: Path, digest: str) -> None:
        """Inside a transaction: the sha256 a tensor file must have when it is read back."""
        conn.execute("INSERT INTO apa_files VALUES (%s, %s, %s) ON CONFLICT (session, name) DO UPDATE "
                     "SET sha256 = excluded.sha256", (self.name, str(path.relative_to(self.root)), digest))

    def _digest(self, name: str) -> str:
        """The sha256 recorded for the tensor file ``name``; ValueError if the database has none."""
        rows = self._query("SELECT sha256 FROM apa_files WHERE session=%s AND name=%s", (self.name, name))
        if not rows:
            raise ValueError("the database has no sha256 for it")
        return rows[0][0]

    def save_round(self, r: int, tensors: dict[str, torch.Tensor], shown: list[int], info: dict[str, Any]) -> None:
        """Persist a sampled round (tensors first, then the row that points at them)."""
        digest = self._save_tensors(self.round_path(r), tensors, f"round {r}'s tensors")

        def body(conn: Any) -> None:
            self._record_file(conn, self.round_path(r), digest)
            conn.execute("INSERT INTO apa_rounds (session, round, status, shown, info, created) "
                         "VALUES (%s, %s, %s, %s, %s, %s)",
                         (self.name, r, SAMPLED, json.dumps(shown), json.dumps(info), time.time()))
        self._commit(f"store round {r}", body)
        self._rounds[r] = {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._query("SELECT round, status, shown, fit_loss, info FROM apa_rounds WHERE session=%s "
                           "ORDER BY round", (self.name,))
        return round_rows(rows)

    def complete_round(self, r: int, fit_loss: float | None, surrogate_state: dict[str, torch.Tensor] | None,
                       info: dict[str, Any]) -> None:
        """Surrogate state file first, then mark the round complete with its fit loss and report info."""
        digest = None
        if surrogate_state is not None:
            digest = self._save_tensors(self.surrogate_path(r), surrogate_state, f"round {r}'s surrogate")

        def body(conn: Any) -> None:
            if digest is not None:
                self._record_file(conn, self.surrogate_path(r), digest)
            old = json.loads(conn.execute("SELECT info FROM apa_rounds WHERE session=%s AND round=%s",
                                          (self.name, r)).fetchone()[0])
            conn.execute("UPDATE apa_rounds SET status=%s, fit_loss=%s, info=%s WHERE session=%s AND round=%s",
                         (FITTED, fit_loss, json.dumps({**old, **info}), self.name, r))
        self._commit(f"complete round {r}", body)

    def update_session(self, changes: dict[str, Any], what: str) -> None:
        """Change options of the session's stored configuration (``session.<name>``) together, all or
        nothing with config.json (see ``_commit``); a ``forget_before`` is also added to the forget points."""
        config = self.config()
        config["session"].update(changes)
        marks = sorted({*self.forget_marks(), changes["forget_before"]}) \
            if changes.get("forget_before") is not None else None

        def body(conn: Any) -> None:
            conn.execute("UPDATE apa_meta SET value=%s WHERE session=%s AND key='config'", (json.dumps(config), self.name))
            if marks is not None:
                self._put_meta(conn, "forget_marks", json.dumps(marks))
        self._commit(what, body, {CONFIG_NAME: json.dumps(config, indent=2).encode()})

    def _put_meta(self, conn: Any, key: str, value: str) -> None:
        conn.execute("INSERT INTO apa_meta VALUES (%s, %s, %s) ON CONFLICT (session, key) DO UPDATE "
                     "SET value = excluded.value", (self.name, key, value))

    def forget_marks(self) -> list[int]:
        """Every round a change of taste was recorded at (``--forget-before``, numbered from 1), in order."""
        value = self._meta("forget_marks")
        return json.loads(value) if value else []

    # ------------------------------------------------------------ ratings

    def add_rating(self, r: int, position: int, score: float | None, source: str) -> None:
        """Record the rating of the ``position``-th shown particle of round r (None: skipped); see ``add_ratings``."""
        self.add_ratings(r, [(position, score)], source)

    def add_ratings(self, r: int, scores: list[tuple[int, float | None]], source: str) -> None:
        """Record ratings of round r's shown particles, (position, score or None), in one transaction: all
        or none, committed before this returns.

        Refused (RatingRefused, nothing written): an unknown round or position, a round already
        complete, a position already rated (or given twice), a non-finite score.
        """
        for position, score in scores:
            if score is not None and not math.isfinite(score):
                raise RatingRefused(f"round {r}, image {position}: the score {score!r} is not a finite number")

        def body(conn: Any) -> None:
            row = conn.execute("SELECT status, shown FROM apa_rounds WHERE session=%s AND round=%s",
                               (self.name, r)).fetchone()
            if row is None:
                raise RatingRefused(f"round {r} does not exist")
            if row[0] != SAMPLED:
                raise RatingRefused(f"round {r} is already complete; its ratings cannot change")
            shown = json.loads(row[1])
            for position, score in scores:
                if not 0 <= position < len(shown):
                    raise RatingRefused(f"round {r} showed {len(shown)} images; there is no image {position}")
                done = conn.execute("INSERT INTO apa_ratings (session, round, position, particle, score, source, "
                                    "created) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                                    (self.name, r, position, shown[position], score, source, time.time()))
                if done.rowcount == 0:
                    raise RatingRefused(f"round {r}, image {position} is already rated")
        self._commit(f"store ratings of round {r}", body)

    def ratings(self, r: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT round, position, particle, score, source FROM apa_ratings WHERE session=%s"
        rows = self._query(q + (" AND round=%s" if r is not None else "") + " ORDER BY round, position",
                           (self.name,) if r is None else (self.name, r))
        return [{"round": a, "position": b, "particle": c, "score": d, "source": e} for a, b, c, d, e in rows]

    def save_record(self, name: str, value: dict[str, Any]) -> None:
        """Store a number the session measured (JSON), replacing an earlier one of that name, durably."""
        self._commit(f"store the {name} record", lambda conn: self._put_meta(conn, f"record:{name}", json.dumps(value)))

    def record(self, name: str) -> dict[str, Any] | None:
        """A record :meth:`save_record` stored, or None."""
        value = self._meta(f"record:{name}")
        return None if value is None else json.loads(value)

    def spent(self) -> int:
        """Feedback spent: ratings with a score (skips cost nothing)."""
        return int(self._query("SELECT count(*) FROM apa_ratings WHERE session=%s AND score IS NOT NULL",
                               (self.name,))[0][0])

    def rows(self) -> dict[str, list[tuple]]:
        """Every row of the session, table -> rows (the SQLite store's columns in key order; ratings in
        commit order): what ``apa.store.copy`` moves and compares."""
        return {t: [tuple(row) for row in self._query(
            f"SELECT {COLUMNS[t]} FROM apa_{t} WHERE session=%s ORDER BY {'seq' if t == 'ratings' else ORDER[t]}",
            (self.name,))] for t in STATE_TABLES}

    def load_rows(self, rows: dict[str, list[tuple]]) -> None:
        """Into a session just created: every row of another (see ``rows``), in one commit; its meta rows
        replace this one's (its "commits" aside: this session counts its own)."""
        def body(conn: Any) -> None:
            for t in STATE_TABLES:
                keep = [row for row in rows[t] if t != "meta" or row[0] != "commits"]
                if t == "meta":
                    conn.execute("DELETE FROM apa_meta WHERE session=%s AND key = ANY(%s)",
                                 (self.name, [row[0] for row in keep]))
                marks = ", ".join(["%s"] * (1 + len(COLUMNS[t].split(","))))
                conn.cursor().executemany(f"INSERT INTO apa_{t} (session, {COLUMNS[t]}) VALUES ({marks})",
                                          [(self.name, *row) for row in keep])
        self._commit("copy the session's rows", body)

    def drop(self) -> None:
        """Delete every row of this session (a copy that failed its check); its files are the caller's."""
        def body(conn: Any) -> None:
            for t in (*STATE_TABLES, "ledgers"):
                conn.execute(f"DELETE FROM apa_{t} WHERE session=%s", (self.name,))
        with self._lock:
            self._transaction(body, None, counted=False, ledger=False)

    def close(self) -> None:
        """Close the connection, which releases the session's lock."""
        self._conn.close()

