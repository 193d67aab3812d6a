"""The durable record of a session, behind one interface: a directory (SQLite + safetensors, the
default: ``apa.store.sqlite``) or a PostgreSQL database with the tensors in a shared directory
(``apa.store.postgres``, for many machines; needs ``pip install 'apa[cluster]'``).

Callers import from here: the store classes, the errors, the lifecycle's names, and the functions
that choose a store: ``create``, ``open_store``, ``read_store``, ``repair`` and ``exists``. A session
is named by its directory (``root``) and, for PostgreSQL, a database URL (``database``); its name in
the database is the directory's name. Nothing here imports psycopg unless a database URL is given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from apa.store.base import (CONFIG_NAME, FINAL_NAME, FITTED, FORMAT, RATED, REPORT_NAME, SAMPLED,
                            DatabaseUnavailable, RatingRefused, SessionBusy, StoreError, disk_errors)
from apa.store.sqlite import DB_NAME, LEDGER_NAME, LOCK_NAME, SessionStore, lock_new, sweep_partials

__all__ = ["CONFIG_NAME", "DB_NAME", "DatabaseUnavailable", "FINAL_NAME", "FITTED", "FORMAT", "LEDGER_NAME",
           "LOCK_NAME", "RATED", "REPORT_NAME", "SAMPLED", "RatingRefused", "SessionBusy", "SessionStore", "Store",
           "StoreError", "create", "disk_errors", "exists", "lock_new", "open_store", "read_store", "repair",
           "sweep_partials"]


class Store(Protocol):
    """What the session, the lifecycle and the web server use of a store (``SessionStore``, ``PostgresStore``).

    Every write is durable before it returns; reads see every acknowledged write. Tensor files live
    below ``root`` and are checked against the sha256 recorded when they were written."""

    root: Path

    def config(self) -> dict[str, Any]: ...
    def kind(self) -> str: ...
    def round_path(self, r: int) -> Path: ...
    def surrogate_path(self, r: int) -> Path: ...
    def save_round(self, r: int, tensors: dict[str, torch.Tensor], shown: list[int], info: dict[str, Any]) -> None: ...
    def round_tensors(self, r: int) -> dict[str, torch.Tensor]: ...
    def rounds(self) -> list[dict[str, Any]]: ...
    def complete_round(self, r: int, fit_loss: float | None, surrogate_state: dict[str, torch.Tensor] | None,
                       info: dict[str, Any]) -> None: ...
    def load_surrogate(self, r: int) -> dict[str, torch.Tensor]: ...
    def check_budget(self, budget: int) -> None: ...
    def extend_budget(self, budget: int) -> None: ...
    def set_session_option(self, name: str, value: Any, what: str) -> None: ...
    def update_session(self, changes: dict[str, Any], what: str) -> None: ...
    def forget_marks(self) -> list[int]: ...
    def add_rating(self, r: int, position: int, score: float | None, source: str) -> None: ...
    def add_ratings(self, r: int, scores: list[tuple[int, float | None]], source: str) -> None: ...
    def ratings(self, r: int | None = None) -> list[dict[str, Any]]: ...
    def stage(self, r: int) -> str: ...
    def open_round(self) -> int | None: ...
    @property
    def final_path(self) -> Path: ...
    @property
    def report_path(self) -> Path: ...
    def save_final(self, images: torch.Tensor) -> Path: ...
    def final_is_current(self) -> bool: ...
    def final_images(self) -> torch.Tensor | None: ...
    def save_record(self, name: str, value: dict[str, Any]) -> None: ...
    def record(self, name: str) -> dict[str, Any] | None: ...
    def spent(self) -> int: ...
    def close(self) -> None: ...


def _postgres():
    """``apa.store.postgres``, imported only when a database URL is given (it needs psycopg)."""
    from apa.store import postgres

    return postgres


def create(root: Path, config: dict[str, Any], kind: str = "fkc", database: str | None = None) -> Store:
    """A new session at ``root`` (a missing or empty directory): SQLite inside it, or the rows in the
    PostgreSQL database at ``database`` and only the tensors and outputs in ``root``."""
    if database is None:
        return SessionStore.create(root, config, kind)
    return _postgres().PostgresStore.create(database, root, config, kind)


def open_store(root: Path, database: str | None = None) -> Store:
    """An existing session for writing, checked whole first (see each store's ``open``)."""
    if database is None:
        return SessionStore.open(root)
    return _postgres().PostgresStore.open(database, root)


def read_store(root: Path, database: str | None = None) -> Store:
    """An existing session, read-only and without its writer's lock."""
    if database is None:
        return SessionStore.read(root)
    return _postgres().PostgresStore.read(database, root)


def repair(root: Path, database: str | None = None) -> str:
    """Check a session as ``open_store`` does and mend what needs no guess; returns what was done."""
    if database is None:
        return SessionStore.repair(root)
    return _postgres().PostgresStore.repair(database, root)


def exists(root: Path, database: str | None = None) -> bool:
    """Whether a session is stored at ``root`` (for PostgreSQL: the database holds a session of its name)."""
    if database is None:
        return (Path(root) / DB_NAME).is_file()
    return _postgres().PostgresStore.exists(database, root)
