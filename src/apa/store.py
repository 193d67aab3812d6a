"""The durable record of a session: SQLite (WAL) for rounds and ratings, safetensors for tensors.

A session is a directory (0700; its files 0600: the web server's directory names are secrets):
  session.sqlite          meta (format, config), rounds, ratings, each tensor file's sha256
  session.ledger          the count and running sha256 of the ratings, and the count of rounds, as
                          of the last commit: written atomically after each one, so a database
                          that lost a commit (a damaged write-ahead log) is refused, never used
  session.lock            flock'ed by the one process writing the session; holds its PID
  config.json             the configuration, for people (the database holds the same)
  rounds/round_0003.safetensors     the round's particles, log-weights and what was shown
  surrogate/round_0003.safetensors  the surrogate state fitted after the round
A new session is built in a hidden sibling directory and renamed into place once its
configuration is stored, so a crash while creating one leaves nothing at its path. Every write
is committed (SQLite) or atomically renamed into place after an fsync (tensors) before the caller
goes on, so a crash at any point loses nothing already acknowledged. Opening a session for
writing first checks it whole: a copy of its database (``PRAGMA quick_check``, the ledger, which
must exist once the session holds anything) and every tensor file against its stored sha256; the
database itself is then read through a read-only connection until the first write, so a damaged
session is refused, and any refusal made before a write leaves every file's bytes as they were.
A session whose ledger is lost is opened again only after ``repair`` accepted its database as it
stands (and recorded that it did).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from apa.atomic import fsync_dir, write_file

FORMAT = "apa-session-1"
DB_NAME = "session.sqlite"
LEDGER_NAME = "session.ledger"
LOCK_NAME = "session.lock"
CONFIG_NAME = "config.json"
FINAL_NAME = "final_samples.npz"  # the final batch: ``images`` float32 [n, C, H, W] in [0, 1]
REPORT_NAME = "report.md"  # beside it: report.json, report.html, the plots and grids/
# The round lifecycle: sampled (tensors stored, shown images chosen) -> rated (every shown image has its
# rating, or a skip) -> fitted (the surrogate refit on all ratings; stored as "complete") -> ... -> final.
SAMPLED, RATED, FITTED = "sampled", "rated", "complete"
PARTIAL = ".apa-new-"  # a session being created: ``.<name>.apa-new-<random>`` beside its final path
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, status TEXT NOT NULL, shown TEXT NOT NULL,
  fit_loss REAL, info TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
  round INTEGER NOT NULL, position INTEGER NOT NULL, particle INTEGER NOT NULL,
  score REAL, source TEXT NOT NULL, created REAL NOT NULL,
  PRIMARY KEY (round, position));
CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL);
"""
_FAILPOINT = {"count": 0}


class StoreError(RuntimeError):
    """The session directory cannot be used as asked; the message says why and what to do."""


class SessionBusy(StoreError):
    """Another process is writing the session."""


class RatingRefused(ValueError):
    """A rating was refused (duplicate, unknown position, non-finite); nothing was written."""


def failpoint(what: str) -> None:
    """Crash on purpose (exit 70) after the N-th durable write when APA_CRASH_AFTER=N (the fault tests)."""
    target = os.environ.get("APA_CRASH_AFTER")
    if target is None:
        return
    _FAILPOINT["count"] += 1
    if _FAILPOINT["count"] == int(target):
        print(f"apa: crash point {target}: after {what}", file=sys.stderr, flush=True)
        os._exit(70)


# ---------------------------------------------------------------- files


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """safetensors written atomically (see ``write_file``); returns the file's sha256."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_file(path, data)
    return hashlib.sha256(data).hexdigest()


def lock(root: Path, create: bool = True) -> IO[bytes]:
    """Hold ``root``'s session lock until the returned file is closed, or SessionBusy naming the holder's PID.
    ``create=False``: FileNotFoundError if there is no lock file."""
    flags = os.O_RDWR | (os.O_CREAT if create else 0)
    f = open(root / LOCK_NAME, "r+b", opener=lambda path, _: os.open(path, flags, 0o600))
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(f.fileno(), 32, 0).decode(errors="replace").strip() or "unknown"
        f.close()
        raise SessionBusy(f"{root} is in use by another apa process (pid {holder}); wait for it to finish "
                          "or stop it, then try again") from None
    _write_pid(f)
    return f


def _write_pid(f: IO[bytes]) -> None:
    f.truncate(0)
    f.seek(0)
    f.write(f"{os.getpid()}\n".encode())
    f.flush()


def lock_new(root: Path) -> IO[bytes]:
    """The lock of a directory being created: held before it appears, so ``sweep_partials`` never takes it."""
    tmp = root / (LOCK_NAME + ".new")
    f = open(tmp, "w+b", opener=lambda path, flags: os.open(path, flags | os.O_EXCL, 0o600))
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    _write_pid(f)
    os.rename(tmp, root / LOCK_NAME)
    return f


def _check_target(root: Path) -> None:
    """Refuse a path that is a file or a non-empty directory (a new session needs a missing or empty one)."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a directory; choose a new directory for the session")
    if root.is_dir() and any(root.iterdir()):
        hint = "use --resume to continue it" if (root / DB_NAME).exists() else "choose an empty or new directory"
        raise StoreError(f"{root} is not empty; {hint}")


def sweep_partials(parent: Path) -> None:
    """Remove sessions whose creation crashed (hidden ``.<name>.apa-new-*`` directories whose lock nobody holds)."""
    for path in parent.glob(f".*{PARTIAL}*"):
        try:
            held = lock(path, create=False)
        except (StoreError, OSError):
            continue  # still being created (held, or its lock not in place yet), or not ours to touch
        with held:
            shutil.rmtree(path)


# ---------------------------------------------------------------- the ledger


def tally(conn: sqlite3.Connection) -> dict[str, Any]:
    """The ledger of a database: its rounds, its ratings and the running sha256 of the ratings in commit order."""
    chain, prefixes = hashlib.sha256(), [hashlib.sha256().hexdigest()]
    for row in conn.execute("SELECT round, position, particle, score, source FROM ratings ORDER BY rowid"):
        chain.update(json.dumps(list(row)).encode())
        prefixes.append(chain.hexdigest())
    rounds = conn.execute("SELECT count(*) FROM rounds").fetchone()[0]
    return {"rounds": rounds, "ratings": len(prefixes) - 1, "chain": prefixes[-1], "prefixes": prefixes}


def read_ledger(root: Path) -> dict[str, Any] | None:
    """The ledger's record, None if there is no ledger; StoreError if it is not one."""
    path = root / LEDGER_NAME
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
        if not (isinstance(recorded, dict) and all(isinstance(recorded.get(k), int) and not isinstance(recorded.get(k), bool)
                                                   for k in ("ratings", "rounds"))
                and isinstance(recorded.get("chain"), str)):
            raise ValueError("it is not an object with whole-number ratings and rounds and a chain")
        return recorded
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is damaged ({e}); the session was left untouched. Restore it from a backup, or run "
                         f"`apa repair {root}` to accept the database as it stands") from e


def check_ledger(db: Path, found: dict[str, Any], ledger: dict[str, Any]) -> None:
    """Refuse a database that holds less than its ledger recorded (it may hold more: a crash between the two)."""
    n = ledger.get("ratings", 0)
    lost = (n > found["ratings"] or found["prefixes"][n] != ledger.get("chain")
            or ledger.get("rounds", 0) > found["rounds"])
    if lost:
        raise StoreError(f"{db} holds {found['ratings']} ratings and {found['rounds']} rounds, but the session "
                         f"recorded {n} ratings and {ledger.get('rounds')} rounds ({LEDGER_NAME}): the database or its "
                         "write-ahead log (-wal) is damaged. It was left untouched; restore the directory from a backup")


def check_database(root: Path) -> dict[str, Any]:
    """Check a copy of the database (so SQLite cannot checkpoint a damaged log into it): integrity and
    format. Returns its tally (see ``tally``) and ``files``, the sha256 recorded for each tensor file."""
    db = root / DB_NAME
    with tempfile.TemporaryDirectory(prefix="apa-verify-") as tmp:
        for name in (DB_NAME, DB_NAME + "-wal"):
            if (root / name).exists():
                shutil.copyfile(root / name, Path(tmp) / name)
        conn = sqlite3.connect(Path(tmp) / DB_NAME, isolation_level=None)
        try:
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            fmt = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            if fmt is None or fmt[0] != FORMAT:
                raise StoreError(f"{db} has format {fmt[0] if fmt else None!r}, expected {FORMAT!r}; "
                                 "it was left untouched")
            found = tally(conn)
            has_files = conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='files'").fetchone()
            found["files"] = dict(conn.execute("SELECT name, sha256 FROM files").fetchall()) if has_files else {}
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{db} is damaged or not an apa session database ({e}); it was left untouched") from e
        finally:
            conn.close()
    return found


def holds_anything(root: Path, found: dict[str, Any]) -> bool:
    """Whether a session has begun: a round or rating in its database, or a tensor file on disk (a
    database whose write-ahead log was lost may show none of its rounds, but their files remain)."""
    return bool(found["rounds"] or found["ratings"] or any((root / d).glob("*.safetensors")
                                                           for d in ("rounds", "surrogate")))


def describe(name: str) -> str:
    """What a tensor file holds: "rounds/round_0003.safetensors" -> "round 3's tensors"."""
    folder, _, file = name.partition("/")
    r = file.removeprefix("round_").removesuffix(".safetensors").lstrip("0") or "0"
    return f"the surrogate fitted after round {r}" if folder == "surrogate" else f"round {r}'s tensors"


def check_files(root: Path, files: dict[str, str]) -> None:
    """Every tensor file the database names is there, with the sha256 stored when it was written."""
    for name, digest in sorted(files.items()):
        path = root / name
        if not path.is_file():
            problem = "missing"
        elif _sha256(path) != digest:
            problem = "damaged: its sha256 is not the one stored when it was written"
        else:
            continue
        raise StoreError(f"{describe(name)} ({name}) in {root} is {problem}; the session was left untouched. "
                         "Restore the directory from a backup")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def verify(root: Path) -> None:
    """Everything ``open`` checks before it reads the session: the database (on a copy), its ledger
    (required once the session holds anything) and every tensor file. StoreError if any fails."""
    found = check_database(root)
    recorded = read_ledger(root)
    if recorded is None and holds_anything(root, found):
        raise StoreError(f"{root / LEDGER_NAME} is missing, so ratings the database may have lost cannot be "
                         f"detected; the session was left untouched. Restore it from a backup, or run `apa repair "
                         f"{root}` to accept the database as it stands ({found['ratings']} ratings, "
                         f"{found['rounds']} rounds)")
    if recorded is not None:
        check_ledger(root / DB_NAME, found, recorded)
    check_files(root, found["files"])


def _public(found: dict[str, Any]) -> dict[str, Any]:
    return {k: found[k] for k in ("rounds", "ratings", "chain")}


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextmanager
def disk_errors(root: Path, what: str, created: bool = True) -> Iterator[None]:
    """OS and SQLite write failures as one StoreError saying what failed and what to do
    (``created``: whether the session is in place, so that ``--resume`` can continue it)."""
    try:
        yield
    except (StoreError, RatingRefused):
        raise
    except (OSError, sqlite3.OperationalError) as e:
        full = isinstance(e, OSError) and e.errno in DISK_FULL or "disk is full" in str(e)
        if full and not created:
            raise StoreError(f"the disk is full: could not {what} in {root} ({e}). Nothing was created; free some "
                             "space, then run the same command again") from e
        if full:
            raise StoreError(f"the disk is full: could not {what} in {root} ({e}). Nothing already stored was "
                             f"lost; free some space, then continue with `apa align --resume {root}`") from e
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StoreError(f"could not {what} in {root} ({detail}); check that the directory exists and that you "
                         "can write to it") from e


class SessionStore:
    def __init__(self, root: Path, conn: sqlite3.Connection, held: IO[bytes] | None = None, writable: bool = True):
        self.root = Path(root)
        self._conn = conn  # reads; the writing connection once there is one
        self._lock = threading.RLock()
        self._held = held  # the session lock (None: opened read-only, see ``read``)
        self._writer = conn if writable else None  # ``open`` reads read-only until the first write
        self._reader = None if writable else conn
        self._rounds: dict[int, dict[str, torch.Tensor]] = {}  # round tensors written or read (they never change)

    # ------------------------------------------------------------ opening

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def create(cls, root: Path, config: dict[str, Any], kind: str = "fkc") -> "SessionStore":
        """A new session at ``root`` (which must be missing or empty); ``kind`` names the sampler loop.

        Built in a hidden sibling directory and renamed to ``root`` once its configuration is stored."""
        root = Path(root)
        _check_target(root)
        with disk_errors(root, "create the session", created=False):
            root.parent.mkdir(parents=True, exist_ok=True)
            sweep_partials(root.parent)
            tmp = root.parent / f".{root.name}{PARTIAL}{secrets.token_hex(4)}"
            os.mkdir(tmp, 0o700)
            try:
                held = lock_new(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        try:
            with disk_errors(root, "create the session", created=False):
                cls._build(tmp, config, kind)
                try:
                    os.rename(tmp, root)
                except OSError as e:  # someone else made ``root`` meanwhile
                    raise StoreError(f"{root} is not empty; choose an empty or new directory") from e
                fsync_dir(root.parent)
            failpoint("create: in place")
            return cls(root, cls._connect(root / DB_NAME), held)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            held.close()
            raise

    @classmethod
    def _build(cls, tmp: Path, config: dict[str, Any], kind: str) -> None:
        """The database (meta and an empty ledger) and config.json in the directory being created."""
        failpoint("create: directory")
        os.close(os.open(tmp / DB_NAME, os.O_WRONLY | os.O_CREAT, 0o600))  # -wal and -shm inherit its mode
        conn = cls._connect(tmp / DB_NAME)
        try:
            conn.executescript(SCHEMA)
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO meta VALUES (?, ?)", [
                    ("format", FORMAT), ("config", json.dumps(config)), ("created", str(time.time())), ("kind", kind)])
            failpoint("create: database")
            write_file(tmp / LEDGER_NAME, json.dumps(_public(tally(conn))).encode())
        finally:
            conn.close()
        write_file(tmp / CONFIG_NAME, json.dumps(config, indent=2).encode())
        failpoint("create: config")

    @classmethod
    def open(cls, root: Path) -> "SessionStore":
        """An existing session, for writing (one process at a time); refuses a directory that is not
        one, a damaged one, or one another process holds, without changing it. It is read through a
        read-only connection until its first write (see ``_writable``)."""
        root = Path(root)
        db = root / DB_NAME
        if not db.is_file():
            raise StoreError(f"{root} is not an apa session (no {DB_NAME}); start one with `apa align --out {root}`")
        with disk_errors(root, "open the session"):
            held = lock(root)
        try:
            verify(root)
            return cls(root, cls._read_only(db), held, writable=False)
        except BaseException:
            held.close()
            raise

    @classmethod
    def repair(cls, root: Path) -> str:
        """Accept the database as it stands in place of a missing or unreadable ledger: write a new
        ledger from it and record in its meta table ("repairs") what was accepted. Everything else
        ``open`` checks must hold; a ledger that disagrees with the database is not repaired (ratings
        were lost: restore a backup). Returns what was done, in a sentence."""
        root = Path(root)
        if not (root / DB_NAME).is_file():
            raise StoreError(f"{root} is not an apa session (no {DB_NAME}); nothing to repair")
        with disk_errors(root, "open the session"):
            held = lock(root)
        store = None
        try:
            found = check_database(root)
            try:
                recorded = read_ledger(root)
                problem = None if recorded is not None else "missing ledger"
            except StoreError as e:
                recorded, problem = None, f"unreadable ledger ({e.__cause__})"
            if recorded is not None:
                check_ledger(root / DB_NAME, found, recorded)
                return (f"{root}: its ledger matches its database ({found['ratings']} ratings, {found['rounds']} "
                        "rounds); nothing to repair")
            check_files(root, found["files"])
            store = cls(root, cls._read_only(root / DB_NAME), held, writable=False)
            record = {"time": time.time(), "accepted": problem, "ratings": found["ratings"],
                      "rounds": found["rounds"], "chain": found["chain"]}
            with store._commit("record the repair"):
                row = store._conn.execute("SELECT value FROM meta WHERE key='repairs'").fetchone()
                repairs = json.loads(row[0]) if row else []
                store._conn.execute("INSERT OR REPLACE INTO meta VALUES ('repairs', ?)", (json.dumps(repairs + [record]),))
            return (f"{root}: accepted the database as it stands in place of a {problem}: {found['ratings']} ratings, "
                    f"{found['rounds']} rounds; a new ledger is written and the repair recorded in {DB_NAME}")
        finally:
            if store is not None:
                store.close()
            else:
                held.close()

    @classmethod
    def read(cls, root: Path) -> "SessionStore":
        """An existing session, read-only and without its lock (to inspect a session another process may be writing)."""
        db = Path(root) / DB_NAME
        if not db.is_file():
            raise StoreError(f"{root} is not an apa session (no {DB_NAME})")
        return cls(Path(root), cls._read_only(db), writable=False)

    @staticmethod
    def _read_only(db: Path) -> sqlite3.Connection:
        """A connection that cannot write, so cannot checkpoint the write-ahead log either."""
        return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30.0, isolation_level=None,
                               check_same_thread=False)

    def _writable(self) -> sqlite3.Connection:
        """The writing connection, opened at the first write of a session ``open`` checked (under ``_lock``)."""
        if self._writer is None:
            if self._held is None:
                raise StoreError(f"{self.root} was opened read-only; open it with SessionStore.open to write")
            conn = sqlite3.connect(f"file:{self.root / DB_NAME}?mode=rw", uri=True, timeout=30.0,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
            self._writer = self._conn = conn  # the read-only one stays open for readers already using it
        return self._writer

    @contextmanager
    def _commit(self, what: str) -> Iterator[None]:
        """One write transaction; then the ledger. Refusals inside it roll everything back."""
        with self._lock, disk_errors(self.root, what):
            with self._writable():
                self._conn.execute("BEGIN IMMEDIATE")
                yield
            failpoint(what)
            write_file(self.root / LEDGER_NAME, json.dumps(_public(tally(self._conn))).encode())

    # ------------------------------------------------------------ meta

    def config(self) -> dict[str, Any]:
        row = self._conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        return json.loads(row[0])

    def kind(self) -> str:
        """Which loop made the session: "fkc" (`apa align`) or a baseline's ("guidance")."""
        row = self._conn.execute("SELECT value FROM meta WHERE key='kind'").fetchone()
        return row[0] if row else "fkc"

    # ------------------------------------------------------------ rounds

    def round_path(self, r: int) -> Path:
        return self.root / "rounds" / f"round_{r:04d}.safetensors"

    def surrogate_path(self, r: int) -> Path:
        return self.root / "surrogate" / f"round_{r:04d}.safetensors"

    def _save_tensors(self, path: Path, tensors: dict[str, torch.Tensor], what: str) -> str:
        with disk_errors(self.root, f"write {what}"):
            digest = atomic_save(tensors, path)
        failpoint(f"write {what}")
        return digest

    def _record_file(self, path: Path, digest: str) -> None:
        """Inside a transaction: the sha256 a tensor file must have when it is read back."""
        self._conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (str(path.relative_to(self.root)), digest))

    def _load_tensors(self, path: Path, what: str) -> dict[str, torch.Tensor]:
        """A tensor file, checked against the sha256 stored when it was written; StoreError if missing or damaged."""
        try:
            row = self._conn.execute("SELECT sha256 FROM files WHERE name=?",
                                     (str(path.relative_to(self.root)),)).fetchone()
        except sqlite3.OperationalError:  # a session older than the table, opened read-only
            row = None
        try:
            data = path.read_bytes()
            if row is not None and hashlib.sha256(data).hexdigest() != row[0]:
                raise ValueError("its sha256 is not the one stored when it was written")
            return load_bytes(data)
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"{what} at {path} is missing or damaged ({e}); the session cannot use it. "
                             "Restore the directory from a backup") from e

    def save_round(self, r: int, tensors: dict[str, torch.Tensor], shown: list[int], info: dict[str, Any]) -> None:
        """Persist a sampled round (tensors first, then the row that points at them)."""
        digest = self._save_tensors(self.round_path(r), tensors, f"round {r}'s tensors")
        with self._commit(f"store round {r}"):
            self._record_file(self.round_path(r), digest)
            self._conn.execute("INSERT INTO rounds (round, status, shown, info, created) VALUES (?, ?, ?, ?, ?)",
                               (r, SAMPLED, json.dumps(shown), json.dumps(info), time.time()))
        self._rounds[r] = {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def round_tensors(self, r: int) -> dict[str, torch.Tensor]:
        """Round r's particles, log-weights and shown indices: from memory once written or read in this
        process (a round never changes once sampled), else from its file, checked."""
        if r not in self._rounds:
            self._rounds[r] = self._load_tensors(self.round_path(r), f"round {r}'s tensors")
        return dict(self._rounds[r])

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT round, status, shown, fit_loss, info FROM rounds ORDER BY round").fetchall()
        return [{"round": r, "status": s, "shown": json.loads(sh), "fit_loss": fl, "info": json.loads(i)}
                for r, s, sh, fl, i in rows]

    def complete_round(self, r: int, fit_loss: float | None, surrogate_state: dict[str, torch.Tensor] | None,
                       info: dict[str, Any]) -> None:
        """Surrogate state file first, then mark the round complete with its fit loss and report info."""
        digest = None
        if surrogate_state is not None:
            digest = self._save_tensors(self.surrogate_path(r), surrogate_state, f"round {r}'s surrogate")
        with self._commit(f"complete round {r}"):
            if digest is not None:
                self._record_file(self.surrogate_path(r), digest)
            old = json.loads(self._conn.execute("SELECT info FROM rounds WHERE round=?", (r,)).fetchone()[0])
            self._conn.execute("UPDATE rounds SET status=?, fit_loss=?, info=? WHERE round=?",
                               (FITTED, fit_loss, json.dumps({**old, **info}), r))

    def load_surrogate(self, r: int) -> dict[str, torch.Tensor]:
        return self._load_tensors(self.surrogate_path(r), f"the surrogate fitted after round {r}")

    def extend_budget(self, budget: int) -> None:
        """Raise the session's budget (stored in its configuration); refuses lowering it."""
        config = self.config()
        old = config["session"]["budget"]
        if budget < old:
            raise StoreError(f"--budget {budget} is below this session's budget {old}; a budget can only be raised")
        if budget != old:
            self.set_session_option("budget", budget, "raise the budget")

    def set_session_option(self, name: str, value: Any, what: str) -> None:
        """Change one option of the session's stored configuration (``session.<name>``), all or nothing."""
        config = self.config()
        previous = json.dumps(config, indent=2).encode()
        config["session"][name] = value
        written = False
        try:  # all or nothing: config.json is written inside the transaction, and put back if the commit fails
            with self._commit(what):
                self._conn.execute("UPDATE meta SET value=? WHERE key='config'", (json.dumps(config),))
                write_file(self.root / CONFIG_NAME, json.dumps(config, indent=2).encode())
                written = True
        except BaseException:
            if written:
                with contextlib.suppress(OSError):
                    write_file(self.root / CONFIG_NAME, previous)
            raise

    # ------------------------------------------------------------ ratings

    def add_rating(self, r: int, position: int, score: float | None, source: str) -> None:
        """Record the rating of the ``position``-th shown particle of round r (None: skipped); see ``add_ratings``."""
        self.add_ratings(r, [(position, score)], source)

    def add_ratings(self, r: int, scores: list[tuple[int, float | None]], source: str) -> None:
        """Record ratings of round r's shown particles, (position, score or None), in one transaction: all or none.

        Refused (RatingRefused, nothing written): an unknown round or position, a round already
        complete, a position already rated (or given twice), a non-finite score.
        """
        for position, score in scores:
            if score is not None and not math.isfinite(score):
                raise RatingRefused(f"round {r}, image {position}: the score {score!r} is not a finite number")
        with self._commit(f"store ratings of round {r}"):
            row = self._conn.execute("SELECT status, shown FROM rounds WHERE round=?", (r,)).fetchone()
            if row is None:
                raise RatingRefused(f"round {r} does not exist")
            if row[0] != SAMPLED:
                raise RatingRefused(f"round {r} is already complete; its ratings cannot change")
            shown = json.loads(row[1])
            for position, score in scores:
                if not 0 <= position < len(shown):
                    raise RatingRefused(f"round {r} showed {len(shown)} images; there is no image {position}")
                try:
                    self._conn.execute("INSERT INTO ratings VALUES (?, ?, ?, ?, ?, ?)",
                                       (r, position, shown[position], score, source, time.time()))
                except sqlite3.IntegrityError as e:
                    raise RatingRefused(f"round {r}, image {position} is already rated") from e

    def ratings(self, r: int | None = None) -> list[dict[str, Any]]:
        q = "SELECT round, position, particle, score, source FROM ratings"
        rows = self._conn.execute(q + (" WHERE round=?" if r is not None else "") + " ORDER BY round, position",
                                  (() if r is None else (r,))).fetchall()
        return [{"round": a, "position": b, "particle": c, "score": d, "source": e} for a, b, c, d, e in rows]

    def stage(self, r: int) -> str:
        """Where round r stands in the lifecycle: SAMPLED, RATED or FITTED."""
        row = self.rounds()[r]
        if row["status"] == FITTED:
            return FITTED
        return RATED if len(self.ratings(r)) >= len(row["shown"]) else SAMPLED

    def open_round(self) -> int | None:
        """The last round if it is not yet fitted (waiting for ratings, or for its refit), else None."""
        rows = self.rounds()
        return rows[-1]["round"] if rows and rows[-1]["status"] != FITTED else None

    @property
    def final_path(self) -> Path:
        return self.root / FINAL_NAME

    @property
    def report_path(self) -> Path:
        return self.root / REPORT_NAME

    def save_final(self, images: torch.Tensor) -> Path:
        """The final batch, images [n, C, H, W] in [0, 1], written atomically as ``final_samples.npz``."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, images=images.detach().float().cpu().numpy().astype(np.float32))
        with disk_errors(self.root, "write the final batch"):
            write_file(self.final_path, buffer.getvalue())
        return self.final_path

    def final_images(self) -> torch.Tensor | None:
        """The final batch [n, C, H, W] if it was written, else None."""
        if not self.final_path.exists():
            return None
        with np.load(self.final_path) as z:
            return torch.from_numpy(z["images"])

    def save_record(self, name: str, value: dict[str, Any]) -> None:
        """Store a number the session measured (JSON), replacing an earlier one of that name, durably."""
        with self._commit(f"store the {name} record"):
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"record:{name}", json.dumps(value)))

    def record(self, name: str) -> dict[str, Any] | None:
        """A record :meth:`save_record` stored, or None."""
        row = self._conn.execute("SELECT value FROM meta WHERE key=?", (f"record:{name}",)).fetchone()
        return None if row is None else json.loads(row[0])

    def spent(self) -> int:
        """Feedback spent: ratings with a score (skips cost nothing)."""
        return int(self._conn.execute("SELECT count(*) FROM ratings WHERE score IS NOT NULL").fetchone()[0])

    def close(self) -> None:
        """Close the database, then release the session's lock."""
        for conn in {id(c): c for c in (self._reader, self._writer, self._conn) if c is not None}.values():
            conn.close()
        if self._held is not None:
            self._held.close()
            self._held = None
