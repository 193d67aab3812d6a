"""The durable record of a session: SQLite (WAL) for rounds and ratings, safetensors for tensors.

A session is a directory (0700; its files 0600: the web server's directory names are secrets):
  session.sqlite          meta (format, config), rounds, ratings, each tensor file's sha256
  session.ledger          as of the last commit: the count and running sha256 of the ratings, the
                          count of rounds and of commits, and a sha256 of every row of every table
                          (records, configuration changes, forget points, files): staged before each
                          commit and renamed into place after it, so a database that lost a commit
                          (a damaged write-ahead log) is refused, never used
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
database itself is then read from an in-memory copy of that checked copy until the first write, so
a damaged session is refused, and any refusal made before a write leaves every file as it was (no
-shm or -wal appears). A change of the configuration lands whole: the database, config.json and
the ledger all change, or none does; temporary files a failure left are removed at the next write.
A session whose ledger is lost is opened again only after ``repair`` accepted its database as it
stands (and recorded that it did); ``repair`` checks everything ``open`` checks and mends nothing
else but temporary files and a config.json that disagrees with the database.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import torch

from apa.atomic import fsync_dir, place, stage_file, write_file
from apa.store.base import (CONFIG_NAME, FITTED, FORMAT, SAMPLED, STATE_TABLES, StoreBase, RatingRefused,
                            SessionBusy, StoreError, describe, disk_errors, failpoint, file_problems, public,
                            rating_chain, round_rows, state_hash, tensor_files)

DB_NAME = "session.sqlite"
LEDGER_NAME = "session.ledger"
LOCK_NAME = "session.lock"
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
    """The ledger of a database: its rounds, its ratings and the running sha256 of the ratings in commit
    order, its commits (meta "commits") and ``state``, a sha256 of every row of every table."""
    prefixes = rating_chain(conn.execute("SELECT round, position, particle, score, source FROM ratings ORDER BY rowid"))
    rounds = conn.execute("SELECT count(*) FROM rounds").fetchone()[0]
    commits = conn.execute("SELECT value FROM meta WHERE key='commits'").fetchone()
    return {"rounds": rounds, "ratings": len(prefixes) - 1, "chain": prefixes[-1], "prefixes": prefixes,
            "commits": int(commits[0]) if commits else 0, "state": state_digest(conn)}


def state_digest(conn: sqlite3.Connection) -> str:
    """A sha256 of every row of the tables a session records (STATE_TABLES), in key order."""
    present = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    return state_hash((table, conn.execute(f"SELECT * FROM {table} ORDER BY {key}"))
                      for table, key in STATE_TABLES.items() if table in present)


def read_ledger(root: Path) -> dict[str, Any] | None:
    """The ledger's record, None if there is no ledger; StoreError if it is not one."""
    path = root / LEDGER_NAME
    if not path.exists():
        return None
    try:
        recorded = json.loads(path.read_text())
        whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if not (isinstance(recorded, dict) and all(whole(recorded.get(k)) for k in ("ratings", "rounds"))
                and isinstance(recorded.get("chain"), str)
                and whole(recorded.get("commits", 0)) and isinstance(recorded.get("state", ""), str)):
            raise ValueError("it is not an object with whole-number ratings and rounds and a chain")
        return recorded
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} is damaged ({e}); the session was left untouched. Restore it from a backup, or run "
                         f"`apa repair {root}` to accept the database as it stands") from e


def check_ledger(db: Path, found: dict[str, Any], ledger: dict[str, Any]) -> None:
    """Refuse a database that holds less than, or other than, its ledger recorded: it may be one commit
    ahead (a crash between the commit and the ledger's rename), never behind, and at the ledger's
    commit every row must be as recorded (ledgers older than the commit count check ratings and rounds)."""
    n = ledger.get("ratings", 0)
    lost = (n > found["ratings"] or found["prefixes"][n] != ledger.get("chain")
            or ledger.get("rounds", 0) > found["rounds"])
    if "commits" in ledger:
        ahead = found["commits"] - ledger["commits"]
        lost = lost or ahead not in (0, 1) or (ahead == 0 and found["state"] != ledger.get("state"))
    if lost:
        raise StoreError(f"{db} holds {found['ratings']} ratings, {found['rounds']} rounds and {found['commits']} "
                         f"commits, but the session recorded {n} ratings, {ledger.get('rounds')} rounds and "
                         f"{ledger.get('commits', 'uncounted')} commits ({LEDGER_NAME}) with other contents: the "
                         "database or its write-ahead log (-wal) is damaged and lost a commit. It was left untouched; "
                         "restore the directory from a backup")


def check_database(root: Path) -> tuple[dict[str, Any], sqlite3.Connection]:
    """Check a copy of the database (so SQLite cannot checkpoint a damaged log into it): integrity and
    format. Returns its tally (see ``tally``) with ``files``, the sha256 recorded for each tensor file,
    and that copy in memory (a connection that reads the session without touching its files)."""
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
            snapshot = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            conn.backup(snapshot)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{db} is damaged or not an apa session database ({e}); it was left untouched") from e
        finally:
            conn.close()
    return found, snapshot


def holds_anything(root: Path, found: dict[str, Any]) -> bool:
    """Whether a session has begun: a round or rating in its database, or a tensor file on disk (a
    database whose write-ahead log was lost may show none of its rounds, but their files remain)."""
    return bool(found["rounds"] or found["ratings"] or tensor_files(root))


def check_files(root: Path, files: dict[str, str]) -> None:
    """Every tensor file the database names is there, with the sha256 stored when it was written."""
    problems = file_problems(root, files)
    if problems:
        raise StoreError(f"{problems[0].replace(') is', f') in {root} is', 1)}; the session was left untouched. "
                         "Restore the directory from a backup")


def verify(root: Path) -> sqlite3.Connection:
    """Everything ``open`` checks before it reads the session: the database (on a copy), its ledger
    (required once the session holds anything) and every tensor file. StoreError if any fails; else
    the checked copy of the database, in memory."""
    found, snapshot = check_database(root)
    try:
        recorded = read_ledger(root)
        if recorded is None and holds_anything(root, found):
            raise StoreError(f"{root / LEDGER_NAME} is missing, so ratings the database may have lost cannot be "
                             f"detected; the session was left untouched. Restore it from a backup, or run `apa "
                             f"repair {root}` to accept the database as it stands ({found['ratings']} ratings, "
                             f"{found['rounds']} rounds)")
        if recorded is not None:
            check_ledger(root / DB_NAME, found, recorded)
        check_files(root, found["files"])
    except BaseException:
        snapshot.close()
        raise
    return snapshot


class SessionStore(StoreBase):
    def __init__(self, root: Path, conn: sqlite3.Connection, held: IO[bytes] | None = None, writable: bool = True):
        self.root = Path(root)
        self._conn = conn  # reads; the writing connection once there is one
        self._lock = threading.RLock()
        self._held = held  # the session lock (None: opened read-only, see ``read``)
        self._writer = conn if writable else None  # ``open`` reads read-only until the first write
        self._reader = None if writable else conn
        self._made: list[Path] = []  # the -wal and -shm the writing connection made (see ``_drop_writer``)
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
            write_file(tmp / LEDGER_NAME, json.dumps(public(tally(conn))).encode())
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
            return cls(root, verify(root), held, writable=False)
        except BaseException:
            held.close()
            raise

    @classmethod
    def repair(cls, root: Path) -> str:
        """Check everything ``open`` checks, all of it, and mend what needs no guess: a missing or
        unreadable ledger (the database accepted as it stands; recorded in its meta table, "repairs"),
        temporary files a failure left and a config.json that disagrees with the database. Anything
        else (a tensor file missing or damaged, a damaged database, a commit the ledger recorded and
        the database lost) is named and refused, and then nothing is changed. Returns what was done."""
        root = Path(root)
        if not (root / DB_NAME).is_file():
            raise StoreError(f"{root} is not an apa session (no {DB_NAME}); nothing to repair")
        with disk_errors(root, "open the session"):
            held = lock(root)
        store = None
        try:
            try:
                found, snapshot = check_database(root)
            except StoreError as e:
                raise StoreError(f"{e}; repair cannot mend a damaged database: restore the directory from a "
                                 "backup") from e
            store = cls(root, snapshot, held, writable=False)
            ledger, problems = cls._diagnose(root, found)
            if problems:
                also = f" (also, {ledger}: repair mends that once the rest is sound)" if ledger else ""
                raise StoreError(f"{root}: {'; '.join(problems)}{also}. Repair cannot mend "
                                 f"{'this' if len(problems) == 1 else 'these'} (only a lost ledger, temporary files "
                                 "and config.json); nothing was changed: restore the directory from a backup")
            return store._mend(found, ledger)
        finally:
            if store is not None:
                store.close()
            else:
                held.close()

    @staticmethod
    def _diagnose(root: Path, found: dict[str, Any]) -> tuple[str | None, list[str]]:
        """What is wrong with a session whose database passed its checks: (the ledger's problem if repair
        can mend it, else None; the problems it cannot mend)."""
        problems = []
        try:
            recorded = read_ledger(root)
            ledger = None if recorded is not None else "its ledger is missing"
        except StoreError as e:
            recorded, ledger = None, f"its ledger is unreadable ({e.__cause__})"
        if recorded is not None:
            try:
                check_ledger(root / DB_NAME, found, recorded)
            except StoreError as e:
                problems.append(str(e).split(" It was left untouched")[0])
        return ledger, problems + file_problems(root, found["files"])

    def _mend(self, found: dict[str, Any], ledger: str | None) -> str:
        """Repair's part once nothing unmendable was found: accept the database in place of a lost
        ledger (recorded), remove temporary files, rewrite config.json from the database."""
        counts = f"{found['ratings']} ratings, {found['rounds']} rounds"
        leftovers, stale = self._leftovers(), self._config_stale()
        if ledger is None and not leftovers and not stale:
            return f"{self.root}: everything checked ({counts}, every tensor file, the ledger); nothing to repair"
        done = []
        if ledger is not None:
            record = {"time": time.time(), "accepted": ledger.removeprefix("its ledger is ") + " ledger",
                      "ratings": found["ratings"], "rounds": found["rounds"], "chain": found["chain"]}
            with self._commit("record the repair"):  # its first write tidies as well (see _writable)
                row = self._conn.execute("SELECT value FROM meta WHERE key='repairs'").fetchone()
                repairs = json.loads(row[0]) if row else []
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('repairs', ?)",
                                   (json.dumps(repairs + [record]),))
            done.append(f"accepted the database as it stands in place of a {record['accepted']} ({counts}); a new "
                        f"ledger is written and the repair recorded in {DB_NAME}. {self._unknown_loss(found)}")
        else:
            with self._lock, disk_errors(self.root, "tidy the session"):
                self._writable()
        if leftovers:
            done.append(f"removed {len(leftovers)} temporary file(s) a failed write left ({', '.join(leftovers)})")
        if stale:
            done.append(f"rewrote {CONFIG_NAME} from the database, which it disagreed with")
        return f"{self.root}: " + "; ".join(done) + ". Nothing else needed mending"

    def _unknown_loss(self, found: dict[str, Any]) -> str:
        """What a database accepted without its ledger may have lost: tensor files on disk it does not
        name are rounds whose commits it lost (with their ratings); otherwise a loss cannot be told."""
        orphans = sorted(tensor_files(self.root) - set(found["files"]))
        if not orphans:
            return "Without the ledger, ratings the database may have lost cannot be told; none is evident"
        return (f"It lost the commits that stored {', '.join(describe(n) for n in orphans)} (the files are on "
                "disk, not in the database): those rounds' ratings are lost and are asked again when it resumes")

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
        """The writing connection, opened at the first write of a session ``open`` checked (under ``_lock``);
        opening it first tidies what an earlier failure left (see ``_tidy``). If it cannot be opened, the
        -wal and -shm files it made are gone again."""
        if self._writer is None:
            if self._held is None:
                raise StoreError(f"{self.root} was opened read-only; open it with SessionStore.open to write")
            made = [self.root / (DB_NAME + x) for x in ("-wal", "-shm") if not (self.root / (DB_NAME + x)).exists()]
            conn = None
            try:
                conn = sqlite3.connect(f"file:{self.root / DB_NAME}?mode=rw", uri=True, timeout=30.0,
                                       isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("CREATE TABLE IF NOT EXISTS files (name TEXT PRIMARY KEY, sha256 TEXT NOT NULL)")
                self._tidy(conn)
            except BaseException:
                if conn is not None:
                    conn.close()
                for path in made:
                    path.unlink(missing_ok=True)
                raise
            self._writer = self._conn = conn  # the in-memory copy stays open for readers already using it
            self._made = made
        return self._writer

    def _drop_writer(self) -> None:
        """Close a writing connection whose first commit failed, and remove the -wal and -shm it made:
        the session's files are as they were, and the next write opens it again."""
        self._writer.close()
        self._writer, self._conn = None, self._reader
        for path in self._made:
            path.unlink(missing_ok=True)
        self._made = []

    def _leftovers(self) -> list[str]:
        """Temporary files a failed or killed write left in the session (``*.tmp``)."""
        return sorted(str(p.relative_to(self.root)) for d in (self.root, self.root / "rounds", self.root / "surrogate")
                      for p in d.glob("*.tmp"))

    def _config_stale(self) -> bool:
        """Whether config.json disagrees with the configuration the database holds."""
        try:
            return json.loads((self.root / CONFIG_NAME).read_text()) != self.config()
        except (OSError, ValueError):
            return True

    def _tidy(self, conn: sqlite3.Connection) -> None:
        """Before a session's first write: remove temporary files, and rewrite config.json if a kill
        between a commit and its rename left the old one."""
        for name in self._leftovers():
            (self.root / name).unlink(missing_ok=True)
        row = conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        if row is not None and self._config_stale():
            write_file(self.root / CONFIG_NAME, json.dumps(json.loads(row[0]), indent=2).encode())

    @contextmanager
    def _commit(self, what: str, files: dict[str, bytes] | None = None, retry: bool = False) -> Iterator[None]:
        """One write transaction, counted (meta "commits"), all or nothing with the ledger and ``files``
        (name -> bytes, written beside the database): each is staged in a temporary file before the
        commit and renamed into place after it, so a full disk fails before anything changed. Refusals
        inside it roll everything back. ``retry``: see ``disk_errors``."""
        with self._lock, disk_errors(self.root, what, retry=retry):
            fresh = self._writer is None
            conn, staged = self._writable(), {}
            try:
                conn.execute("BEGIN IMMEDIATE")
                yield
                conn.execute("INSERT INTO meta VALUES ('commits', '1') ON CONFLICT(key) DO UPDATE "
                             "SET value = CAST(value AS INTEGER) + 1")
                ledger = json.dumps(public(tally(conn))).encode()
                for name, data in {**(files or {}), LEDGER_NAME: ledger}.items():
                    staged[self.root / name] = stage_file(self.root / name, data)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                for tmp in staged.values():
                    tmp.unlink(missing_ok=True)
                if fresh:
                    self._drop_writer()
                raise
            failpoint(what)
            for path, tmp in staged.items():
                place(tmp, path)

    # ------------------------------------------------------------ meta

    def config(self) -> dict[str, Any]:
        row = self._conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()
        return json.loads(row[0])

    def kind(self) -> str:
        """Which loop made the session: "fkc" (`apa align`) or a baseline's ("guidance")."""
        row = self._conn.execute("SELECT value FROM meta WHERE key='kind'").fetchone()
        return row[0] if row else "fkc"

    # ------------------------------------------------------------ rounds

    def _record_file(self, path: Path, digest: str) -> None:
        """Inside a transaction: the sha256 a tensor file must have when it is read back."""
        self._conn.execute("INSERT OR REPLACE INTO files VALUES (?, ?)", (str(path.relative_to(self.root)), digest))

    def _digest(self, name: str) -> str | None:
        """The sha256 recorded for the tensor file ``name``; None where there is none to check against."""
        try:
            row = self._conn.execute("SELECT sha256 FROM files WHERE name=?", (name,)).fetchone()
        except sqlite3.OperationalError:  # a session older than the table, opened read-only
            return None
        return None if row is None else row[0]

    def save_round(self, r: int, tensors: dict[str, torch.Tensor], shown: list[int], info: dict[str, Any]) -> None:
        """Persist a sampled round (tensors first, then the row that points at them)."""
        digest = self._save_tensors(self.round_path(r), tensors, f"round {r}'s tensors")
        with self._commit(f"store round {r}"):
            self._record_file(self.round_path(r), digest)
            self._conn.execute("INSERT INTO rounds (round, status, shown, info, created) VALUES (?, ?, ?, ?, ?)",
                               (r, SAMPLED, json.dumps(shown), json.dumps(info), time.time()))
        self._rounds[r] = {k: v.detach().cpu().clone() for k, v in tensors.items()}

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT round, status, shown, fit_loss, info FROM rounds ORDER BY round").fetchall()
        return round_rows(rows)

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

    def update_session(self, changes: dict[str, Any], what: str) -> None:
        """Change options of the session's stored configuration (``session.<name>``) together, all or
        nothing: the database, config.json and the ledger (see ``_commit``). A ``forget_before`` is
        also added to the session's forget points (meta "forget_marks"), so an earlier one is kept."""
        config = self.config()
        config["session"].update(changes)
        with self._commit(what, {CONFIG_NAME: json.dumps(config, indent=2).encode()}, retry=True):
            self._conn.execute("UPDATE meta SET value=? WHERE key='config'", (json.dumps(config),))
            if changes.get("forget_before") is not None:
                marks = sorted({*self.forget_marks(), changes["forget_before"]})
                self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('forget_marks', ?)", (json.dumps(marks),))

    def forget_marks(self) -> list[int]:
        """Every round a change of taste was recorded at (``--forget-before``, numbered from 1), in order."""
        row = self._conn.execute("SELECT value FROM meta WHERE key='forget_marks'").fetchone()
        return json.loads(row[0]) if row else []

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

    def rows(self) -> dict[str, list[tuple]]:
        """Every row of the session, table -> rows (STATE_TABLES' columns in key order; ratings in commit
        order): what ``apa.store.copy`` moves and compares."""
        return {table: [tuple(row) for row in self._conn.execute(
            f"SELECT * FROM {table} ORDER BY {'rowid' if table == 'ratings' else key}")]
            for table, key in STATE_TABLES.items()}

    def load_rows(self, rows: dict[str, list[tuple]]) -> None:
        """Into a session just created: every row of another (see ``rows``), in one commit; its meta rows
        replace this one's (its "commits" aside: this session counts its own)."""
        with self._commit("copy the session's rows"):
            for table in STATE_TABLES:
                for row in rows[table]:
                    if table != "meta" or row[0] != "commits":
                        self._conn.execute(f"INSERT OR REPLACE INTO {table} VALUES ({', '.join('?' * len(row))})",
                                           row)

    def close(self) -> None:
        """Close the database, then release the session's lock."""
        for conn in {id(c): c for c in (self._reader, self._writer, self._conn) if c is not None}.values():
            conn.close()
        if self._held is not None:
            self._held.close()
            self._held = None
