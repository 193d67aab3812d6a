"""The durable record of a session: SQLite (WAL) for rounds and ratings, safetensors for tensors.

A session is a directory:
  session.sqlite          meta (format, config), rounds, ratings
  rounds/round_0003.safetensors     the round's particles, log-weights and what was shown
  surrogate/round_0003.safetensors  the surrogate state fitted after the round
Every write is committed (SQLite) or atomically renamed into place after an fsync (tensors)
before the caller goes on, so a crash at any point loses nothing already acknowledged.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "apa-session-1"
DB_NAME = "session.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, status TEXT NOT NULL, shown TEXT NOT NULL,
  fit_loss REAL, info TEXT NOT NULL DEFAULT '{}', created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS ratings (
  round INTEGER NOT NULL, position INTEGER NOT NULL, particle INTEGER NOT NULL,
  score REAL, source TEXT NOT NULL, created REAL NOT NULL,
  PRIMARY KEY (round, position));
"""


class StoreError(RuntimeError):
    """The session directory cannot be used as asked; the message says why and what to do."""


class RatingRefused(ValueError):
    """A rating was refused (duplicate, unknown position, non-finite); nothing was written."""


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors to a temporary file, fsync, rename into place, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class SessionStore:
    def __init__(self, root: Path, conn: sqlite3.Connection):
        self.root = Path(root)
        self._conn = conn
        self._lock = threading.RLock()

    # ------------------------------------------------------------ opening

    @staticmethod
    def _connect(path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    @classmethod
    def create(cls, root: Path, config: dict[str, Any], kind: str = "fkc") -> "SessionStore":
        """A new session in ``root`` (which must be missing or empty); ``kind`` names the sampler loop."""
        root = Path(root)
        if root.exists() and any(root.iterdir()):
            hint = "use --resume to continue it" if (root / DB_NAME).exists() else "choose an empty or new directory"
            raise StoreError(f"{root} is not empty; {hint}")
        root.mkdir(parents=True, exist_ok=True)
        conn = cls._connect(root / DB_NAME)
        conn.executescript(SCHEMA)
        with conn:
            conn.execute("BEGIN")
            conn.execute("INSERT INTO meta VALUES ('format', ?)", (FORMAT,))
            conn.execute("INSERT INTO meta VALUES ('config', ?)", (json.dumps(config),))
            conn.execute("INSERT INTO meta VALUES ('created', ?)", (str(time.time()),))
            conn.execute("INSERT INTO meta VALUES ('kind', ?)", (kind,))
        return cls(root, conn)

    @classmethod
    def open(cls, root: Path) -> "SessionStore":
        """An existing session; refuses a directory that is not one, or a damaged one, without changing it."""
        root = Path(root)
        db = root / DB_NAME
        if not db.is_file():
            raise StoreError(f"{root} is not an apa session (no {DB_NAME}); start one with `apa align --out {root}`")
        try:
            conn = sqlite3.connect(f"file:{db}?mode=rw", uri=True, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            fmt = conn.execute("SELECT value FROM meta WHERE key='format'").fetchone()
            conn.execute("SELECT count(*) FROM rounds").fetchone()
            conn.execute("SELECT count(*) FROM ratings").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{db} is damaged or not an apa session database ({e}); it was left untouched") from e
        if fmt is None or fmt[0] != FORMAT:
            raise StoreError(f"{db} has format {fmt[0] if fmt else None!r}, expected {FORMAT!r}; it was left untouched")
        conn.execute("PRAGMA synchronous=FULL")
        return cls(root, conn)

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

    def save_round(self, r: int, tensors: dict[str, torch.Tensor], shown: list[int], info: dict[str, Any]) -> None:
        """Persist a sampled round (tensors first, then the row that points at them)."""
        atomic_save(tensors, self.round_path(r))
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            self._conn.execute("INSERT INTO rounds (round, status, shown, info, created) VALUES (?, 'sampled', ?, ?, ?)",
                               (r, json.dumps(shown), json.dumps(info), time.time()))

    def round_tensors(self, r: int) -> dict[str, torch.Tensor]:
        path = self.round_path(r)
        try:
            return load_file(str(path))
        except (FileNotFoundError, SafetensorError, OSError) as e:
            raise StoreError(f"round {r}'s tensors at {path} are missing or damaged ({e})") from e

    def rounds(self) -> list[dict[str, Any]]:
        rows = self._conn.execute("SELECT round, status, shown, fit_loss, info FROM rounds ORDER BY round").fetchall()
        return [{"round": r, "status": s, "shown": json.loads(sh), "fit_loss": fl, "info": json.loads(i)}
                for r, s, sh, fl, i in rows]

    def complete_round(self, r: int, fit_loss: float | None, surrogate_state: dict[str, torch.Tensor] | None,
                       info: dict[str, Any]) -> None:
        """Surrogate state file first, then mark the round complete with its fit loss and report info."""
        if surrogate_state is not None:
            atomic_save(surrogate_state, self.surrogate_path(r))
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            old = json.loads(self._conn.execute("SELECT info FROM rounds WHERE round=?", (r,)).fetchone()[0])
            self._conn.execute("UPDATE rounds SET status='complete', fit_loss=?, info=? WHERE round=?",
                               (fit_loss, json.dumps({**old, **info}), r))

    def load_surrogate(self, r: int) -> dict[str, torch.Tensor]:
        return load_file(str(self.surrogate_path(r)))

    # ------------------------------------------------------------ ratings

    def add_rating(self, r: int, position: int, score: float | None, source: str) -> None:
        """Record the rating of the ``position``-th shown particle of round r (None: skipped).

        Refused (RatingRefused, nothing written): an unknown round or position, a round already
        complete, a position already rated, a non-finite score.
        """
        if score is not None and not math.isfinite(score):
            raise RatingRefused(f"round {r}, image {position}: the score {score!r} is not a finite number")
        with self._lock, self._conn:
            self._conn.execute("BEGIN IMMEDIATE")
            row = self._conn.execute("SELECT status, shown FROM rounds WHERE round=?", (r,)).fetchone()
            if row is None:
                raise RatingRefused(f"round {r} does not exist")
            if row[0] != "sampled":
                raise RatingRefused(f"round {r} is already complete; its ratings cannot change")
            shown = json.loads(row[1])
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

    def spent(self) -> int:
        """Feedback spent: ratings with a score (skips cost nothing)."""
        return int(self._conn.execute("SELECT count(*) FROM ratings WHERE score IS NOT NULL").fetchone()[0])

    def close(self) -> None:
        self._conn.close()
