"""Fault injection for `apa align` sessions: kills at every durable write, double kills, two writers,
a full disk, damaged files (and `apa repair` on them), lost commits of any kind, changes of taste,
bad flags. Each fault ends in a one-line error that changed nothing stored (and made no file), or
in a resumed session bit-identical to the uninterrupted run.

Random choices are drawn from APA_FAULT_SEED (default 14), printed with every failure; rerun a
failure with that seed. The README's "How sessions are tested" table counts these tests.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from apa import atomic
from apa import store as store_module
from apa.store import base as store_base
from apa.store import sqlite as store_sqlite
from apa.cli import main
from apa.store import DB_NAME, LEDGER_NAME, SessionStore

SEED = int(os.environ.get("APA_FAULT_SEED", "14"))
TINY = ["--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "4", "--eval-samples", "8",
        "--epochs", "10", "--seed", "3"]
CREATE_WRITES = 4  # directory, database, config, renamed into place
WRITES = CREATE_WRITES + 2 * 8  # per round: tensors, row, 4 ratings, surrogate, complete


def patch_store(monkeypatch, name: str, value) -> None:
    """Replace ``name`` (``write_file``, ``stage_file``) in every SQLite-store module that writes with it."""
    for module in (store_base, store_sqlite):
        if name in vars(module):
            monkeypatch.setattr(module, name, value)


def cli(*args: str, crash_after: int | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("APA_CRASH_AFTER", None)
    if crash_after is not None:
        env["APA_CRASH_AFTER"] = str(crash_after)
    return subprocess.run([sys.executable, "-m", "apa.cli", *args], env=env, capture_output=True, text=True)


def one_line_error(text: str) -> str:
    """The one line an error prints (no traceback), without its prefix."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # progress bars' cursor moves
    lines = [x for x in re.split(r"[\r\n]", plain) if x.strip() and not re.search(r"\d+%\|", x)]
    assert len(lines) == 1 and lines[0].startswith("apa: error: "), text[-3000:]
    assert "Traceback" not in text
    return lines[0]


def stored(out: Path) -> dict:
    """What the session holds: rounds, ratings (without their timestamps) and every tensor file's sha256."""
    s = SessionStore.read(out)
    try:
        return {"rounds": [(r["round"], r["status"], r["shown"], r["fit_loss"], r["info"]) for r in s.rounds()],
                "ratings": [(x["round"], x["position"], x["particle"], x["score"]) for x in s.ratings()],
                "files": {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in sorted(out.glob("*/*.safetensors"))},
                "config": s.config()}
    finally:
        s.close()


def fingerprint(out: Path) -> dict:
    with np.load(out / "final_samples.npz") as z:
        final = hashlib.sha256(z["images"].tobytes()).hexdigest()
    return {**stored(out), "final": final}


def kept(before: dict, after: dict) -> None:
    """Nothing already stored changed: ratings are a prefix, completed rounds and their files are the same."""
    assert after["ratings"][: len(before["ratings"])] == before["ratings"]
    for row in before["rounds"]:
        if row[1] == "complete":
            assert row in after["rounds"]
    for name, digest in before["files"].items():
        if name.startswith("surrogate") or any(f"round_{r[0]:04d}" in name for r in before["rounds"]):
            assert after["files"].get(name) == digest, name


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory) -> Path:
    """The uninterrupted run's directory, as `apa align` left it; never opened (tests get copies)."""
    out = tmp_path_factory.mktemp("whole") / "s"
    run = cli("align", "--out", str(out), *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def whole(whole_run, tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must end equal to."""
    return fingerprint(copied(whole_run, tmp_path_factory.mktemp("whole_read") / "s"))


def copied(session: Path, to: Path) -> Path:
    """A byte-for-byte copy of a closed session's directory, its files' modes kept."""
    shutil.copytree(session, to)
    return to


def finish(out: Path, whole: dict, context: str) -> None:
    resumed = cli("align", "--resume", str(out))
    assert resumed.returncode == 0, (context, resumed.stderr[-3000:])
    assert fingerprint(out) == whole, context


# ---------------------------------------------------------------- kills


def test_a_kill_at_every_write_then_resume_is_bit_identical(tmp_path, whole):
    """Kill the creating process at each creation write, then kill each resume at its first write, so
    every one of the session's writes is killed once; the session ends identical to the whole run."""
    out = tmp_path / "s"
    for point in range(1, CREATE_WRITES):  # before the rename: nothing at the path, and a new --out works
        run = cli("align", "--out", str(out), *TINY, crash_after=point)
        assert run.returncode == 70, (point, run.stderr[-3000:])
        assert not out.exists(), f"crash point {point}: {run.stderr[-300:]}"
        assert "not an apa session" in one_line_error(cli("align", "--resume", str(out)).stderr)
    run = cli("align", "--out", str(out), *TINY, crash_after=CREATE_WRITES)
    assert run.returncode == 70, run.stderr[-3000:]
    assert not list(tmp_path.glob(".*apa-new-*")), "a crashed creation was not swept"
    for n in range(CREATE_WRITES + 1, WRITES + 1):
        before = stored(out)
        run = cli("align", "--resume", str(out), crash_after=1)
        assert run.returncode == 70, (n, run.stderr[-3000:])
        kept(before, stored(out))
    finish(out, whole, "after a kill at every write")


def test_seeded_double_kill_then_resume_is_bit_identical(tmp_path, whole):
    """A kill at a seeded point, a second kill of the resume at another, then a resume to the end."""
    rng = random.Random(SEED)
    first, second = rng.randint(CREATE_WRITES, WRITES - 1), rng.randint(1, 6)
    context = f"APA_FAULT_SEED={SEED}: killed after write {first}, then after the resume's write {second}"
    out = tmp_path / "s"
    assert cli("align", "--out", str(out), *TINY, crash_after=first).returncode == 70, context
    before = stored(out)
    assert cli("align", "--resume", str(out), crash_after=second).returncode == 70, context
    kept(before, stored(out))
    finish(out, whole, context)


def test_two_concurrent_resumes_leave_one_writer(tmp_path, whole):
    out = tmp_path / "s"
    assert cli("align", "--out", str(out), *TINY, crash_after=CREATE_WRITES + 3).returncode == 70
    held = SessionStore.open(out)  # this process holds the session: a resume is refused, naming it
    before = stored(out)
    try:
        run = cli("align", "--resume", str(out))
    finally:
        held.close()
    assert run.returncode == 2 and f"pid {os.getpid()}" in one_line_error(run.stderr)
    assert stored(out) == before
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    both = [subprocess.Popen([sys.executable, "-m", "apa.cli", "align", "--resume", str(out)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in both]
    for code, err in results:  # each finished the session, or was refused while the other held it
        assert code == 0 or (code == 2 and "in use by another apa process" in one_line_error(err)), err[-3000:]
    assert fingerprint(out) == whole


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_says_so_and_the_session_resumes(tmp_path, whole, monkeypatch, capsys, one_thread):
    """Every file write (tensors, the ledger, config.json) from a seeded one on fails with ENOSPC."""
    real, calls = atomic.write_file, {"n": 0}
    fail_from = random.Random(SEED + 1).randint(1, 12)

    def full(path, data):
        calls["n"] += 1
        if calls["n"] >= fail_from:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    out = tmp_path / "s"
    patch_store(monkeypatch, "write_file", full)
    assert main(["align", "--out", str(out), *TINY]) == 2, f"APA_FAULT_SEED={SEED}: full from write {fail_from}"
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and "--resume" in line, line
    patch_store(monkeypatch, "write_file", real)
    if out.exists():
        finish(out, whole, f"APA_FAULT_SEED={SEED}: full from write {fail_from}")
    else:  # the disk filled while the session was being created: nothing is left at its path
        assert not list(tmp_path.glob(".*apa-new-*"))


# ---------------------------------------------------------------- damaged files


@pytest.fixture
def finished(tmp_path, whole_run) -> Path:
    """A finished session of its own to damage or extend: a copy of the uninterrupted run, which is the
    session `align --out` with the same flags writes (its ratings' timestamps aside)."""
    return copied(whole_run, tmp_path / "s")


def digests(out: Path) -> dict:
    """Every file's sha256 (but the lock's, SQLite's shared-memory index and an empty write-ahead log)."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "session.lock"
            and not p.name.endswith("-shm") and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


@pytest.mark.parametrize("kind", ["rounds", "surrogate"])
def test_a_flipped_bit_in_a_tensor_file_is_refused(finished, kind, capsys):
    """A flipped bit in the last round's tensors, or in the last surrogate (the one the final batch uses)."""
    path = sorted((finished / kind).glob("round_*.safetensors"))[-1]
    r = int(path.stem.split("_")[1])
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))
    before = digests(finished)
    with pytest.raises(store_module.StoreError, match=f"round {r}.*damaged"):  # every file is checked at open
        SessionStore.open(finished)
    s = SessionStore.read(finished)
    with pytest.raises(store_module.StoreError, match="damaged"):
        (s.round_tensors if kind == "rounds" else s.load_surrogate)(r)
    s.close()
    assert main(["align", "--resume", str(finished)]) == 2
    assert kind in one_line_error(capsys.readouterr().err)
    assert digests(finished) == before


def crashed_copy(s: SessionStore, to: Path) -> Path:
    """The files a process killed now would leave: the database and its write-ahead log, not checkpointed."""
    to.mkdir()
    for p in s.root.iterdir():
        if p.is_file() and not p.name.endswith("-shm"):
            shutil.copyfile(p, to / p.name)
    return to


def test_a_damaged_write_ahead_log_is_refused_and_left_untouched(tmp_path, capsys):
    import torch

    s = SessionStore.create(tmp_path / "s", {"session": {"budget": 12}})
    s.save_round(0, {"particles": torch.zeros(12, 2)}, list(range(12)), {})
    for p in range(12):
        s.add_rating(0, p, 1.0, "oracle")
    copy = crashed_copy(s, tmp_path / "copy")
    s.close()
    wal = copy / (DB_NAME + "-wal")
    data = bytearray(wal.read_bytes())
    at = random.Random(SEED + 2).randint(len(data) // 2, len(data) - 100)  # in a later commit's frames
    data[at] ^= 0xFF
    wal.write_bytes(bytes(data))
    before = digests(copy)
    with pytest.raises(store_module.StoreError, match="recorded 12 ratings"):
        SessionStore.open(copy)
    assert main(["align", "--resume", str(copy)]) == 2
    assert "write-ahead log" in one_line_error(capsys.readouterr().err), f"APA_FAULT_SEED={SEED}: byte {at}"
    assert digests(copy) == before  # not checkpointed: the log and the database are as they were


def test_a_damaged_database_fails_quick_check(tmp_path):
    import torch

    s = SessionStore.create(tmp_path / "s", {})
    s.save_round(0, {"particles": torch.zeros(4, 2)}, [0, 1], {})
    s.close()
    db = tmp_path / "s" / DB_NAME
    data = bytearray(db.read_bytes())
    for i in range(4096, 4096 + 64):  # the second page's b-tree header
        data[i] ^= 0x5A
    db.write_bytes(bytes(data))
    with pytest.raises(store_module.StoreError, match="damaged"):
        SessionStore.open(tmp_path / "s")


def test_a_lost_ledger_commit_is_refused(tmp_path):
    """The database holding fewer ratings than the ledger recorded (however it lost them) is refused."""
    import json

    import torch

    s = SessionStore.create(tmp_path / "s", {})
    s.save_round(0, {"particles": torch.zeros(4, 2)}, [0, 1], {})
    s.add_rating(0, 0, 1.0, "oracle")
    ledger = json.loads((tmp_path / "s" / LEDGER_NAME).read_text())
    s.add_rating(0, 1, 1.0, "oracle")
    s.close()
    s = SessionStore.open(tmp_path / "s")  # the database ahead of its ledger (a kill between them) is fine
    s._writable().execute("DELETE FROM ratings WHERE position=1")
    s.close()
    with pytest.raises(store_module.StoreError, match="holds 1 ratings"):
        SessionStore.open(tmp_path / "s")
    assert ledger["ratings"] == 1


# ---------------------------------------------------------------- bad flags, refused before anything is written

BAD_FLAGS = [["--epochs", "0"], ["--ensemble", "0"], ["--feature-t", "5000"], ["--feature-t", "-1"],
             ["--eval-samples", "-4"], ["--eval-samples", "0"], ["--budget", "0"], ["--per-round", "0"],
             ["--budget", "2"], ["--lr", "nan"], ["--fit-batch-size", "0"], ["--ceiling", "inf"],
             ["--surrogate", "bogus"], ["--acquisition", "bogus"], ["--mode", "bogus"], ["--temperature", "0"],
             ["--init", "bogus"], ["--height", "7"], ["--guidance-scale", "nan"], ["--seed", "-1"],
             ["--particles", "2"], ["--steps", "0"], ["--resample", "bogus"], ["--beta", "nan,8"],
             ["--ess-threshold", "2"], ["--weights", "bogus"], ["--label-noise", "0.5"], ["--final-start", "bogus"],
             ["--restart", "0"], ["--final-move", "0"], ["--final-move", "1000"], ["--final-unseen", "1"],
             ["--final-unseen", "-0.1"], ["--taste", "style:7:bold"],
             ["--taste", "like:"], ["--taste-share", "0.5"], ["--taste-pool", "4"],
             # found by an outside fault run: each wrote a session before it was refused, or printed a traceback
             ["--seed", "1180591620717411303424"], ["--prior", "gmm"], ["--particles", "1000000000000"],
             ["--steps", "1000000000000"], ["--eval-samples", "1000000000000"], ["--prior-weights", __file__],
             ["--device", "bogus"], ["--prefer", "1,1"],
             # type errors: one line, not the usage block
             ["--budget", "nan"], ["--steps", "ten"], ["--prefer", ""], ["--gamma", "a,b"], ["--beta", "1"],
             # a taste that changes: half a drift, a switch past the budget, an unknown class, a bad span
             ["--drift-to", "2,3"], ["--drift-at", "3"], ["--drift-to", "2,3", "--drift-at", "8"],
             ["--drift-to", "2,12", "--drift-at", "4"], ["--drift-to", "2,2", "--drift-at", "4"],
             ["--drift-to", "2", "--drift-at", "4", "--drift-span", "-1"],
             # issue 35: a taste change that means nothing at creation, drift flags with no effect
             ["--forget-before", "3"], ["--forget-before", "99999999999999999999"], ["--drift-span", "4"],
             ["--drift-to", "2,,3", "--drift-at", "4"], ["--drift-to", "9,7,4,1", "--drift-at", "4"],
             ["--drift-to", "0,1,2,3,4,5,6,7,8,9", "--drift-at", "4"],
             ["--drift-to", "2", "--drift-at", "4", "--drift-span", "100"], ["--drift-to", "2", "--drift-at", "0"]]
if not __import__("torch").cuda.is_available():
    BAD_FLAGS.append(["--device", "cuda"])
ALL_BAD = [pytest.param(f, id=" ".join(f)) for f in BAD_FLAGS]
ALIGN_ONLY = [["--prefer", "1,12"], ["--feedback", "human"], ["--oracle-weights", __file__]]
EXPECTED = {"--prefer 1,12": "unknown class(es) [12]", "--drift-to 2,3 --drift-at 8": "--drift-at 8",
            "--drift-to 2,12 --drift-at 4": "unknown class(es) [12]",
            "--drift-to 2 --drift-at 4 --drift-span -1": "--drift-span",
            "--drift-to 9,7,4,1 --drift-at 4": "--prefer", "--drift-to 2 --drift-at 4 --drift-span 100": "--drift-span",
            "--drift-to 0,1,2,3,4,5,6,7,8,9 --drift-at 4": "every class",
            "--drift-to 2 --drift-at 0": "--drift-at"}  # what the line must name where it is not the flag itself


@pytest.mark.parametrize("flags", ALL_BAD + [pytest.param(f, id=" ".join(f)) for f in ALIGN_ONLY])
def test_a_bad_align_flag_is_one_line_and_writes_nothing(tmp_path, flags, capsys):
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), *TINY, *flags]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert EXPECTED.get(" ".join(flags), flags[0]) in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", ALL_BAD)
def test_a_bad_serve_flag_is_one_line_and_writes_nothing(tmp_path, flags, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(uvicorn.Server, "run", started)
    data = tmp_path / "data"
    assert main(["serve", "--data-dir", str(data), *[x for x in TINY if x != "--seed" and x != "3"], *flags]) == 2
    one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def _port_in_use() -> list[str]:
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    _HELD.append(sock)
    return ["--port", str(sock.getsockname()[1])]


_HELD: list = []  # sockets held open for the duration of the tests
SERVE_ONLY = [["--port", "-1"], ["--port", "70000"], ["--port", "0"], ["--workers", "0"], ["--max-sessions", "0"],
              ["--max-sessions", "-5"], ["--host", "nosuch.invalid"], ["--port", "in-use"], ["--port", "x"],
              ["--batch-window", "-0.1"], ["--batch-window", "nan"], ["--batch-window", "60"]]


@pytest.mark.parametrize("flags", [pytest.param(f, id=" ".join(f)) for f in SERVE_ONLY])
def test_a_bad_serve_setting_is_one_line_before_anything_is_written(tmp_path, flags, capsys, monkeypatch):
    """Port, host, workers, batch window and session limit: refused before the data directory is made or the
    server starts."""
    pytest.importorskip("uvicorn")
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    monkeypatch.setattr(uvicorn.Server, "run", started)
    flags = _port_in_use() if flags == ["--port", "in-use"] else flags
    assert main(["serve", "--data-dir", str(tmp_path / "data"), *TINY[:-2], *flags]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert flags[0] in line, line
    assert list(tmp_path.iterdir()) == []


def test_out_that_is_a_file_or_unwritable_is_one_line(tmp_path, capsys, monkeypatch):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["align", "--out", str(taken), *TINY]) == 2
    assert "is a file" in one_line_error(capsys.readouterr().err) and taken.read_text() == "mine"

    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", denied)  # a read-only parent (the tests may run as root, who may write anywhere)
    assert main(["align", "--out", str(tmp_path / "ro" / "s"), *TINY]) == 2
    assert "Permission denied" in one_line_error(capsys.readouterr().err)


def test_resume_refuses_flags_but_raises_the_budget(finished, capsys, one_thread):
    before = digests(finished)
    assert main(["align", "--resume", str(finished), "--budget", "40", "--prefer", "0", "--steps", "3"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "--prefer" in line and "--steps" in line and "--budget 40" not in line, line
    assert main(["align", "--resume", str(finished), "--budget", "4"]) == 2
    assert "only be raised" in one_line_error(capsys.readouterr().err)
    assert main(["align", "--resume", str(finished), "--forget-before", "9"]) == 2  # past the session's rounds
    assert "--forget-before 9" in one_line_error(capsys.readouterr().err)
    assert digests(finished) == before  # every file of the session, byte for byte
    old = stored(finished)
    assert main(["align", "--resume", str(finished), "--budget", "12"]) == 0
    new = stored(finished)
    kept(old, new)
    assert len(new["ratings"]) == 12 and new["config"]["session"]["budget"] == 12
    assert __import__("json").loads((finished / "config.json").read_text())["session"]["budget"] == 12


def test_a_full_database_says_the_disk_is_full(tmp_path):
    import torch

    s = SessionStore.create(tmp_path / "s", {})
    s.save_round(0, {"particles": torch.zeros(4, 2)}, [0, 1], {})
    pages = s._conn.execute("PRAGMA page_count").fetchone()[0]
    s._conn.execute(f"PRAGMA max_page_count={pages}")  # SQLITE_FULL, as on a full disk
    with pytest.raises(store_module.StoreError, match="disk is full.*--resume"):
        s.add_rating(0, 0, 1.0, "x" * 100_000)
    assert s.ratings() == []


COMPARE_BAD = [["--particles", "2"], ["--epochs", "0"], ["--eval-samples", "0"], ["--per-round", "0"], ["--steps", "0"],
               ["--threads", "-2"], ["--threads", "0"], ["--methods", ""], ["--papa-lr", "nan"],
               ["--refine-t", "5000"], ["--prior-weights", __file__], ["--seeds", "two"]]


@pytest.mark.parametrize("flags", [pytest.param(f, id=" ".join(f)) for f in COMPARE_BAD])
def test_a_bad_compare_flag_is_one_line_and_writes_nothing(tmp_path, flags, capsys):
    methods = [] if "--methods" in flags else ["--methods", "fkc,guidance,papa,best_of_n"]
    assert main(["compare", "--out", str(tmp_path / "c"), *methods, *flags]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert flags[0] in line, line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- damage refused before anything is written

MIDWAY = CREATE_WRITES + 8 + 4  # round 0 fitted (its surrogate stored), round 1 sampled with 2 of its 4 ratings


@pytest.fixture(scope="module")
def midway(tmp_path_factory) -> Path:
    """A session killed mid-round: its write-ahead log holds both rounds and 6 ratings, not checkpointed."""
    out = tmp_path_factory.mktemp("midway") / "s"
    run = cli("align", "--out", str(out), *TINY, crash_after=MIDWAY)
    assert run.returncode == 70, run.stderr[-3000:]
    assert (out / (DB_NAME + "-wal")).stat().st_size > 0
    return out


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # inside the tensor data: the file still parses
    path.write_bytes(bytes(data))


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


DAMAGE = {  # what is done to the session -> a word the refusal must say
    "a flipped bit in a round file": (lambda s: _flip(s / "rounds" / "round_0000.safetensors"), "damaged"),
    "a flipped bit in a surrogate file": (lambda s: _flip(s / "surrogate" / "round_0000.safetensors"), "damaged"),
    "a deleted round file": (lambda s: (s / "rounds" / "round_0000.safetensors").unlink(), "missing"),
    "a deleted surrogate file": (lambda s: (s / "surrogate" / "round_0000.safetensors").unlink(), "missing"),
    "two round files swapped": (lambda s: _swap(s / "rounds" / "round_0000.safetensors",
                                                s / "rounds" / "round_0001.safetensors"), "damaged"),
    "a deleted ledger": (lambda s: (s / LEDGER_NAME).unlink(), "apa repair"),
    "a deleted ledger and write-ahead log": (lambda s: [(s / n).unlink() for n in (LEDGER_NAME, DB_NAME + "-wal")],
                                             "apa repair"),
    "a ledger that is a list": (lambda s: (s / LEDGER_NAME).write_text("[1, 2]"), "apa repair"),
    "a ledger whose count is text": (lambda s: (s / LEDGER_NAME).write_text('{"ratings": "8"}'), "apa repair"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damage_is_refused_before_anything_is_written(midway, tmp_path, damage, capsys, one_thread):
    """`--resume` on a damaged session: one line, and every file's bytes as they were (no rating taken,
    no ledger rewritten, no checkpoint of the write-ahead log)."""
    copy = tmp_path / "s"
    shutil.copytree(midway, copy)
    do, says = DAMAGE[damage]
    do(copy)
    before = digests(copy)
    assert main(["align", "--resume", str(copy)]) == 2
    assert says in one_line_error(capsys.readouterr().err)
    assert digests(copy) == before


def test_repair_accepts_a_missing_ledger_and_records_it(midway, tmp_path, capsys):
    import json

    copy = tmp_path / "s"
    shutil.copytree(midway, copy)
    (copy / LEDGER_NAME).unlink()
    assert main(["repair", str(copy)]) == 0
    assert "6 ratings" in capsys.readouterr().out
    SessionStore.open(copy).close()  # opens again
    s = SessionStore.read(copy)
    try:
        repairs = json.loads(s._conn.execute("SELECT value FROM meta WHERE key='repairs'").fetchone()[0])
    finally:
        s.close()
    assert repairs[0]["accepted"].startswith("missing") and repairs[0]["ratings"] == 6
    before = digests(copy)
    assert main(["repair", str(copy)]) == 0  # nothing left to repair
    assert "nothing to repair" in capsys.readouterr().out and digests(copy) == before


def test_a_refused_budget_raise_changes_nothing(finished, monkeypatch, capsys, one_thread):
    """config.json cannot be written: the database keeps the old budget too."""
    import json

    real = atomic.stage_file

    def denied(path, data, *args, **kwargs):
        if path.name == "config.json":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, data, *args, **kwargs)

    before = every_file(finished)
    patch_store(monkeypatch, "stage_file", denied)
    assert main(["align", "--resume", str(finished), "--budget", "12"]) == 2
    assert "budget" in one_line_error(capsys.readouterr().err)
    assert every_file(finished) == before  # no -shm, no -wal, no *.tmp
    assert stored(finished)["config"]["session"]["budget"] == 8
    assert json.loads((finished / "config.json").read_text())["session"]["budget"] == 8


def test_report_files_are_private(finished):
    import stat

    paths = [finished / "grids", *finished.glob("report.*"), *finished.glob("*.png"), *finished.glob("grids/*")]
    assert (finished / "grids").is_dir() and len(paths) > 5
    for p in paths:
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600), p


def test_a_full_disk_at_creation_says_nothing_was_created(tmp_path, monkeypatch, capsys):
    def full(path, data, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    patch_store(monkeypatch, "write_file", full)
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), *TINY]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and "--resume" not in line and "nothing was created" in line.lower(), line
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_report_says_so_in_one_line(finished, monkeypatch, capsys, one_thread):
    import apa.cli

    def full(view):
        raise OSError(errno.ENOSPC, "No space left on device", str(view.state.store.root / "report.html"))

    monkeypatch.setattr(apa.cli, "write_report", full)
    assert main(["align", "--resume", str(finished)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and "report" in line and f"--resume {finished}" in line, line


# ---------------------------------------------------------------- issue 35: the record is never wrong


def every_file(out: Path) -> dict:
    """Every file's sha256, the lock's, SQLite's -shm and an empty -wal included: a refusal makes no file."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != "session.lock"} | \
        {"files": sorted(str(p.relative_to(out)) for p in out.rglob("*"))}


REPAIR_CANNOT = ["a flipped bit in a round file", "a flipped bit in a surrogate file", "a deleted round file",
                 "a deleted surrogate file", "two round files swapped"]


@pytest.mark.parametrize("damage", REPAIR_CANNOT)
def test_repair_names_damage_it_cannot_mend_and_changes_nothing(midway, tmp_path, damage, capsys):
    """Hole 1: `apa repair` checks what resume checks; a damaged tensor file is named, never "nothing to repair"."""
    copy = tmp_path / "s"
    shutil.copytree(midway, copy)
    do, says = DAMAGE[damage]
    do(copy)
    before = every_file(copy)
    assert main(["repair", str(copy)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert says in line and "backup" in line and "nothing to repair" not in line, line
    assert every_file(copy) == before


def test_repair_with_a_lost_ledger_and_a_damaged_file_mends_nothing(midway, tmp_path, capsys):
    """Hole 1: a missing ledger is mendable, a damaged file is not: both named, no ledger written."""
    copy = tmp_path / "s"
    shutil.copytree(midway, copy)
    (copy / LEDGER_NAME).unlink()
    _flip(copy / "rounds" / "round_0001.safetensors")
    before = every_file(copy)
    assert main(["repair", str(copy)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "round 1" in line and "ledger" in line, line
    assert every_file(copy) == before


def test_repair_of_a_lost_commit_refuses(midway, tmp_path, capsys):
    copy = tmp_path / "s"
    shutil.copytree(midway, copy)
    s = SessionStore.open(copy)
    s._writable().execute("DELETE FROM ratings WHERE rowid = (SELECT min(rowid) FROM ratings)")
    s.close()
    before = every_file(copy)
    assert main(["repair", str(copy)]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "backup" in line and "nothing to repair" not in line, line
    assert every_file(copy) == before


def fail_writes_from(monkeypatch, n: int, error: int = errno.ENOSPC) -> None:
    """Every file written through ``os.write`` (the session's atomic writes) from the n-th on fails."""
    real, calls = os.write, {"n": 0}

    def full(fd, data):
        calls["n"] += 1
        if calls["n"] >= n:
            raise OSError(error, os.strerror(error))
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)


@pytest.mark.parametrize("n", [1, 2])  # the staged config.json, the staged ledger
def test_a_budget_raise_and_forget_before_land_whole_or_not_at_all(finished, monkeypatch, capsys, n, one_thread):
    """Hole 2: on a full disk, from any of the writes on, the session keeps its budget, its memory and its bytes."""
    import json

    before = every_file(finished)
    fail_writes_from(monkeypatch, n)
    assert main(["align", "--resume", str(finished), "--budget", "12", "--forget-before", "2"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and "nothing was changed" in line.lower() and "again" in line, line
    monkeypatch.undo()
    assert every_file(finished) == before, f"write {n}"
    assert stored(finished)["config"]["session"]["budget"] == 8
    assert json.loads((finished / "config.json").read_text())["session"]["budget"] == 8


def test_leftover_temporary_files_are_cleaned_by_the_next_write(finished, capsys, one_thread):
    """Hole 2: *.tmp files a crash left (config.json.tmp, session.ledger.tmp) go at the next successful write."""
    for name in ("config.json.tmp", "session.ledger.tmp"):
        (finished / name).write_bytes(b"half")
    assert main(["align", "--resume", str(finished), "--budget", "12"]) == 0
    assert not list(finished.glob("*.tmp"))


def test_a_disk_io_error_on_a_full_disk_says_the_disk_is_full(finished, monkeypatch, capsys, one_thread):
    """Hole 3: SQLite's "disk I/O error" with a few KB free is the disk being full; nothing was changed."""
    import sqlite3  # patched where every store connection is made

    real = sqlite3.connect

    def shm_fails(target, *args, **kwargs):
        if "mode=rw" in str(target):
            raise sqlite3.OperationalError("disk I/O error")
        return real(target, *args, **kwargs)

    before = every_file(finished)
    monkeypatch.setattr(sqlite3, "connect", shm_fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(4 << 20, 4 << 20, 8192))
    assert main(["align", "--resume", str(finished), "--budget", "12"]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and "nothing was changed" in line.lower() and "again" in line, line
    assert every_file(finished) == before


def test_a_refused_resume_creates_no_file(finished, capsys):
    """A plain validation refusal: not even SQLite's -shm or an empty -wal appears."""
    before = every_file(finished)
    for flags in (["--budget", "4"], ["--prefer", "0"], ["--forget-before", "9"]):
        assert main(["align", "--resume", str(finished), *flags]) == 2
        one_line_error(capsys.readouterr().err)
        assert every_file(finished) == before, flags


def _last_commit_lost(s: SessionStore, tmp_path: Path) -> Path:
    """A copy of the session whose write-ahead log lost its last commit (its last frame damaged)."""
    copy = crashed_copy(s, tmp_path / "copy")
    s.close()
    wal = copy / (DB_NAME + "-wal")
    data = bytearray(wal.read_bytes())
    data[-100] ^= 0xFF
    wal.write_bytes(bytes(data))
    return copy


LAST_COMMITS = {
    "a record": lambda s: s.save_record("final_checks", {"ok": 1}),
    "a budget raise": lambda s: s.extend_budget(16),
    "a forget point": lambda s: s.set_session_option("forget_before", 1, "forget"),
    "a round completed": lambda s: s.complete_round(0, 0.5, None, {}),
}


@pytest.mark.parametrize("last", list(LAST_COMMITS))
def test_a_lost_commit_of_any_kind_is_refused(tmp_path, last):
    """Hole 4: the ledger covers every table, not only the ratings and the count of rounds."""
    import torch

    s = SessionStore.create(tmp_path / "s", {"session": {"budget": 8}})
    s.save_round(0, {"particles": torch.zeros(4, 2)}, [0, 1], {})
    s.add_ratings(0, [(0, 1.0), (1, -1.0)], "oracle")
    LAST_COMMITS[last](s)
    copy = _last_commit_lost(s, tmp_path)
    before = every_file(copy)
    with pytest.raises(store_module.StoreError, match="write-ahead log"):
        SessionStore.open(copy)
    assert every_file(copy) == before


def test_forget_before_on_a_finished_session_is_refused_without_a_budget_raise(finished, capsys):
    """Hole 6: no round is left to refit, so the change of taste would change nothing; one line, no byte."""
    before = every_file(finished)
    for at in ("2", "3"):
        assert main(["align", "--resume", str(finished), "--forget-before", at]) == 2
        line = one_line_error(capsys.readouterr().err)
        assert "--budget" in line and "finished" in line, line
    assert every_file(finished) == before


def test_forget_before_with_a_budget_raise_redraws_and_a_second_keeps_both(finished, capsys, one_thread):
    """Holes 6 and 7: with a raised budget the new rounds forget the earlier ones and the final batch is
    redrawn; a second change keeps the first mark; one going back before it is refused."""
    import json

    final = fingerprint(finished)["final"]
    assert main(["align", "--resume", str(finished), "--budget", "12", "--forget-before", "3"]) == 0
    assert fingerprint(finished)["final"] != final
    before = every_file(finished)
    assert main(["align", "--resume", str(finished), "--budget", "16", "--forget-before", "2"]) == 2
    assert "--forget-before 3" in one_line_error(capsys.readouterr().err)
    assert every_file(finished) == before
    assert main(["align", "--resume", str(finished), "--budget", "16", "--forget-before", "4"]) == 0
    report = json.loads((finished / "report.json").read_text())
    assert [r["round"] for r in report["rounds"] if r["taste_changed"]] == [2, 3]


def test_a_huge_window_warns_nothing(tmp_path, capsys, one_thread):
    """Hole 8: --window past the ratings held is all of them, quietly."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["align", "--out", str(tmp_path / "s"), *TINY, "--window", "99999999999999999999",
                     "--quiet"]) == 0
    assert not [w for w in caught if "slice" in str(w.message)], [str(w.message) for w in caught]


def test_resuming_a_finished_session_keeps_its_timings(finished, one_thread):
    import json

    timings = json.loads((finished / "report.json").read_text())["timings"]
    assert main(["align", "--resume", str(finished), "--quiet"]) == 0
    again = json.loads((finished / "report.json").read_text())["timings"]
    for key in ("sampling", "surrogate_fit", "io", "feedback"):
        assert again.get(key) is not None and again[key] >= timings[key], (key, again)
