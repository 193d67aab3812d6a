"""What every session store shares: the names of a session's parts and of the round lifecycle, the
errors, the tensor files (written atomically, each checked by its sha256) and the digests that
tell whether the recorded ratings and rows are the ones written.

A store keeps four kinds of rows per session, whatever holds them (SQLite or PostgreSQL):
  meta     key -> value (TEXT): "format", "config" (JSON), "kind", "created", "commits" (a count of
           write transactions), "forget_marks", "record:<name>" (JSON), "repairs"
  rounds   round, status, shown (JSON), fit_loss, info (JSON), created
  ratings  round, position, particle, score (NULL: skipped), source, created; in commit order
  files    name (relative to the session's root) -> sha256 of the tensor file when it was written
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from apa.atomic import write_file

FORMAT = "apa-session-1"
CONFIG_NAME = "config.json"
FINAL_NAME = "final_samples.npz"  # the final batch: ``images`` float32 [n, C, H, W] in [0, 1]
REPORT_NAME = "report.md"  # beside it: report.json, report.html, the plots and grids/
# The round lifecycle: sampled (tensors stored, shown images chosen) -> rated (every shown image has its
# rating, or a skip) -> fitted (the surrogate refit on all ratings; stored as "complete") -> ... -> final.
SAMPLED, RATED, FITTED = "sampled", "rated", "complete"
TENSOR_DIRS = ("rounds", "surrogate")  # where a session's tensor files live, below its root
# The tables a session records, each with the key its rows are digested in (see ``state_hash``).
STATE_TABLES = {"meta": "key", "rounds": "round", "ratings": "round, position", "files": "name"}
_FAILPOINT = {"count": 0}


class StoreError(RuntimeError):
    """The session cannot be used as asked; the message says why and what to do."""


class SessionBusy(StoreError):
    """Another process is writing the session."""


class DatabaseUnavailable(StoreError):
    """The session's database cannot be reached now (down or restarting); nothing unconfirmed was
    acknowledged, and the same call can be made again once it is back."""


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


# ---------------------------------------------------------------- tensor files


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    """safetensors written atomically (see ``write_file``); returns the file's sha256."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = save_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_file(path, data)
    return hashlib.sha256(data).hexdigest()


def final_bytes(images: torch.Tensor) -> bytes:
    """The final batch's file: images [n, C, H, W] in [0, 1] as float32 ``images`` in a compressed npz."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, images=images.detach().float().cpu().numpy().astype(np.float32))
    return buffer.getvalue()


def read_final(path: Path) -> torch.Tensor | None:
    """The final batch [n, C, H, W] stored at ``path`` (see ``final_bytes``), None if it was not written."""
    if not path.exists():
        return None
    with np.load(path) as z:
        return torch.from_numpy(z["images"])


def round_name(r: int) -> str:
    """Round r's tensor file, relative to the session's root: "rounds/round_0003.safetensors"."""
    return f"rounds/round_{r:04d}.safetensors"


def surrogate_name(r: int) -> str:
    """The file of the surrogate fitted after round r, relative to the session's root."""
    return f"surrogate/round_{r:04d}.safetensors"


def round_rows(rows: Iterable[tuple]) -> list[dict[str, Any]]:
    """Rows (round, status, shown JSON, fit_loss, info JSON) as the dicts ``rounds()`` returns."""
    return [{"round": r, "status": s, "shown": json.loads(sh), "fit_loss": fl, "info": json.loads(i)}
            for r, s, sh, fl, i in rows]


def describe(name: str) -> str:
    """What a tensor file holds: "rounds/round_0003.safetensors" -> "round 3's tensors"."""
    folder, _, file = name.partition("/")
    r = file.removeprefix("round_").removesuffix(".safetensors").lstrip("0") or "0"
    return f"the surrogate fitted after round {r}" if folder == "surrogate" else f"round {r}'s tensors"


def sha256_file(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def file_problems(root: Path, files: dict[str, str]) -> list[str]:
    """What is wrong with the tensor files the database names: each one missing, or whose sha256 is
    not the one stored when it was written ("round 1's tensors (rounds/round_0001.safetensors) is missing")."""
    out = []
    for name, digest in sorted(files.items()):
        path = root / name
        if not path.is_file():
            out.append(f"{describe(name)} ({name}) is missing")
        elif sha256_file(path) != digest:
            out.append(f"{describe(name)} ({name}) is damaged: its sha256 is not the one stored when it was written")
    return out


def tensor_files(root: Path) -> set[str]:
    """The tensor files on disk below ``root`` (names relative to it)."""
    return {str(p.relative_to(root)) for d in TENSOR_DIRS for p in (root / d).glob("*.safetensors")}


# ---------------------------------------------------------------- digests of the rows


def rating_chain(rows: Iterable[Iterable[Any]]) -> list[str]:
    """The running sha256 of ratings rows (round, position, particle, score, source) in commit order:
    the digest before any rating, then after each one (so a prefix of the ratings can be checked)."""
    chain, prefixes = hashlib.sha256(), [hashlib.sha256().hexdigest()]
    for row in rows:
        chain.update(json.dumps(list(row)).encode())
        prefixes.append(chain.hexdigest())
    return prefixes


def state_hash(tables: Iterable[tuple[str, Iterable[Iterable[Any]]]]) -> str:
    """A sha256 of every row of every table, each table's rows in its key order (STATE_TABLES)."""
    h = hashlib.sha256()
    for table, rows in tables:
        for row in rows:
            h.update(json.dumps([table, *row]).encode())
    return h.hexdigest()


def public(found: dict[str, Any]) -> dict[str, Any]:
    """The part of a tally a ledger records."""
    return {k: found[k] for k in ("rounds", "ratings", "chain", "commits", "state")}


# ---------------------------------------------------------------- write failures


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
LOW_SPACE = 1 << 20  # bytes free below which SQLite's "disk I/O error" (a -shm or -wal it could not grow) is a full disk


def is_full(e: BaseException, root: Path) -> bool:
    """Whether a write failed for want of space: ENOSPC/EDQUOT, SQLITE_FULL, or an I/O error with almost
    nothing free where the session is."""
    if isinstance(e, OSError):
        return e.errno in DISK_FULL
    if "disk is full" in str(e):
        return True
    if "disk I/O error" not in str(e):
        return False
    try:
        return shutil.disk_usage(root).free < LOW_SPACE
    except OSError:
        return False


@contextmanager
def disk_errors(root: Path, what: str, created: bool = True, retry: bool = False) -> Iterator[None]:
    """OS and SQLite write failures as one StoreError saying what failed and what to do
    (``created``: whether the session is in place, so that ``--resume`` can continue it; ``retry``:
    the failed step changed nothing and the command that asked for it may simply be run again)."""
    try:
        yield
    except (StoreError, RatingRefused):
        raise
    except (OSError, sqlite3.OperationalError) as e:
        full = is_full(e, root)
        if full and retry:
            raise StoreError(f"the disk is full: could not {what} in {root} ({e}). Nothing was changed; free some "
                             "space, then run the same command again") from e
        if full and not created:
            raise StoreError(f"the disk is full: could not {what} in {root} ({e}). Nothing was created; free some "
                             "space, then run the same command again") from e
        if full:
            raise StoreError(f"the disk is full: could not {what} in {root} ({e}). Nothing already stored was "
                             f"lost; free some space, then continue with `apa align --resume {root}`") from e
        detail = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise StoreError(f"could not {what} in {root} ({detail}); check that the directory exists and that you "
                         "can write to it") from e


class StoreBase:
    """What every store builds the same way on its own primitives: where a round stands, the open
    round, the budget, the tensor files' paths and their writing, the surrogate's tensors and the
    final batch. A store provides ``root``, ``config``, ``rounds``, ``ratings``, ``record``,
    ``save_record``, ``update_session``, ``_digest`` (a tensor file's recorded sha256) and ``_rounds``
    (round -> its tensors, kept in memory once written or read)."""

    root: Path
    _rounds: dict[int, dict[str, torch.Tensor]]

    def _load_tensors(self, path: Path, what: str) -> dict[str, torch.Tensor]:
        """A tensor file, checked against the sha256 stored when it was written (``_digest``); StoreError if
        missing or damaged."""
        try:
            digest = self._digest(str(path.relative_to(self.root)))
            data = path.read_bytes()
            if digest is not None and hashlib.sha256(data).hexdigest() != digest:
                raise ValueError("its sha256 is not the one stored when it was written")
            return load_bytes(data)
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"{what} at {path} is missing or damaged ({e}); the session cannot use it. "
                             "Restore the directory from a backup") from e

    def round_tensors(self, r: int) -> dict[str, torch.Tensor]:
        """Round r's particles, log-weights and shown indices: from memory once written or read in this
        process (a round never changes once sampled), else from its file, checked."""
        if r not in self._rounds:
            self._rounds[r] = self._load_tensors(self.round_path(r), f"round {r}'s tensors")
        return dict(self._rounds[r])

    def round_path(self, r: int) -> Path:
        return self.root / round_name(r)

    def surrogate_path(self, r: int) -> Path:
        return self.root / surrogate_name(r)

    def _save_tensors(self, path: Path, tensors: dict[str, torch.Tensor], what: str) -> str:
        with disk_errors(self.root, f"write {what}"):
            digest = atomic_save(tensors, path)
        failpoint(f"write {what}")
        return digest

    def load_surrogate(self, r: int) -> dict[str, torch.Tensor]:
        return self._load_tensors(self.surrogate_path(r), f"the surrogate fitted after round {r}")

    def check_budget(self, budget: int) -> None:
        """Refuse lowering the session's budget."""
        old = self.config()["session"]["budget"]
        if budget < old:
            raise StoreError(f"--budget {budget} is below this session's budget {old}; a budget can only be raised")

    def extend_budget(self, budget: int) -> None:
        """Raise the session's budget (stored in its configuration); refuses lowering it."""
        self.check_budget(budget)
        if budget != self.config()["session"]["budget"]:
            self.update_session({"budget": budget}, "raise the budget")

    def set_session_option(self, name: str, value: Any, what: str) -> None:
        """Change one option of the session's stored configuration (``session.<name>``), all or nothing."""
        self.update_session({name: value}, what)

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
        with disk_errors(self.root, "write the final batch"):
            write_file(self.final_path, final_bytes(images))
        self.save_record("final_batch", {"rounds": len(self.rounds())})  # the rounds it was drawn after
        return self.final_path

    def final_is_current(self) -> bool:
        """The final batch exists and was drawn after the last round: one drawn before the budget was
        raised (and more rounds run) is not (a batch stored before this was recorded counts as current)."""
        if not self.final_path.exists():
            return False
        drawn = self.record("final_batch")
        return drawn is None or drawn["rounds"] == len(self.rounds())

    def final_images(self) -> torch.Tensor | None:
        """The final batch [n, C, H, W] if it was written, else None."""
        return read_final(self.final_path)
