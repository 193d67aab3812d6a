"""Moving a session between stores: a SQLite directory into a PostgreSQL database and back.

The copy is checked before it is kept: the source is opened as for writing (checked whole, and
locked, so nothing changes it meanwhile), the destination must not exist, and after the copy every
row (ratings in their commit order, rounds, records and the configuration, each tensor file's
sha256) and every file below the destination's root are compared with the source's. A copy that
fails its check is removed again; the source is never changed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from apa.store import DB_NAME, LEDGER_NAME, LOCK_NAME, Store, StoreError, create, exists, open_store
from apa.store.base import CONFIG_NAME, file_problems, sha256_file

# The files that belong to a store's own bookkeeping, not to the session: each store writes its own.
OWN = {DB_NAME, DB_NAME + "-wal", DB_NAME + "-shm", LEDGER_NAME, LOCK_NAME, CONFIG_NAME}


def where(root: Path, database: str | None) -> str:
    return f"{root} (in {database})" if database else str(root)


def session_files(root: Path) -> dict[str, str]:
    """The files below a session's root that a copy carries (tensors, the final batch, the report;
    not a store's own files nor temporary ones): name relative to root -> sha256."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in OWN and not p.name.endswith(".tmp")}


def copy_session(src: Path, dst: Path, src_database: str | None = None, dst_database: str | None = None) -> str:
    """Copy the session at ``src`` (SQLite, or the rows in ``src_database``) to a new one at ``dst``
    (SQLite, or the rows in ``dst_database``), checked; returns what was copied. Refuses an existing
    destination, and a damaged or busy source, before anything is written."""
    src, dst = Path(src), Path(dst)
    if exists(dst, dst_database) or (dst.exists() and (not dst.is_dir() or any(dst.iterdir()))):
        raise StoreError(f"{where(dst, dst_database)} already exists; a copy never overwrites a session: choose "
                         "another destination")
    source = open_store(src, src_database)
    try:
        rows, files = source.rows(), session_files(source.root)
        target = create(dst, source.config(), source.kind(), dst_database)
        try:
            for name in files:
                (dst / name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                shutil.copy2(src / name, dst / name)
            target.load_rows(rows)
            check_copy(target, rows, files)
        except BaseException:
            discard(target, dst_database)
            raise
        target.close()
    finally:
        source.close()
    counts = {t: len(r) for t, r in rows.items()}
    return (f"copied {where(src, src_database)} -> {where(dst, dst_database)}: {counts['ratings']} ratings, "
            f"{counts['rounds']} rounds, {counts['files']} tensor files, {len(files)} files in all; every row and "
            "every file's sha256 checked")


def check_copy(target: Store, rows: dict[str, list[tuple]], files: dict[str, str]) -> None:
    """StoreError unless the copy holds exactly the source's rows (but its own count of commits) and files."""
    copied = target.rows()
    for table, expected in rows.items():
        if table == "meta":
            expected, got = ([r for r in x if r[0] != "commits"] for x in (expected, copied[table]))
        else:
            got = copied[table]
        if got != expected:
            raise StoreError(f"the copy's {table} differ from the source's ({len(got)} rows, {len(expected)} "
                             "expected); it was removed")
    problems = file_problems(target.root, dict(copied["files"]))
    if problems or session_files(target.root) != files:
        raise StoreError(f"the copy's files differ from the source's ({'; '.join(problems) or 'other files'}); "
                         "it was removed")


def discard(target: Store, database: str | None) -> None:
    """Remove a copy that failed: its rows (PostgreSQL) and its directory."""
    try:
        if database is not None:
            target.drop()
    finally:
        target.close()
        shutil.rmtree(target.root, ignore_errors=True)
