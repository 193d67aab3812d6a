"""Fault injection for `apa align` sessions: kills at every durable write, double kills, two writers,
a full disk, damaged files, bad flags. Each fault ends in a one-line error that changed nothing
stored, or in a resumed session bit-identical to the uninterrupted run.

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

from apa import store as store_module
from apa.cli import main
from apa.store import DB_NAME, LEDGER_NAME, SessionStore

SEED = int(os.environ.get("APA_FAULT_SEED", "14"))
TINY = ["--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "4", "--eval-samples", "8",
        "--epochs", "10", "--seed", "3"]
CREATE_WRITES = 4  # directory, database, config, renamed into place
WRITES = CREATE_WRITES + 2 * 8  # per round: tensors, row, 4 ratings, surrogate, complete


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
def whole(tmp_path_factory) -> dict:
    """The uninterrupted run every interrupted one must end equal to."""
    out = tmp_path_factory.mktemp("whole") / "s"
    run = cli("align", "--out", str(out), *TINY)
    assert run.returncode == 0, run.stderr[-3000:]
    return fingerprint(out)


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
    real, calls = store_module.write_file, {"n": 0}
    fail_from = random.Random(SEED + 1).randint(1, 12)

    def full(path, data):
        calls["n"] += 1
        if calls["n"] >= fail_from:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    out = tmp_path / "s"
    monkeypatch.setattr(store_module, "write_file", full)
    assert main(["align", "--out", str(out), *TINY]) == 2, f"APA_FAULT_SEED={SEED}: full from write {fail_from}"
    line = one_line_error(capsys.readouterr().err)
    assert "disk is full" in line and "--resume" in line, line
    monkeypatch.setattr(store_module, "write_file", real)
    if out.exists():
        finish(out, whole, f"APA_FAULT_SEED={SEED}: full from write {fail_from}")
    else:  # the disk filled while the session was being created: nothing is left at its path
        assert not list(tmp_path.glob(".*apa-new-*"))


# ---------------------------------------------------------------- damaged files


@pytest.fixture
def finished(tmp_path, whole) -> Path:
    out = tmp_path / "s"
    assert cli("align", "--out", str(out), *TINY).returncode == 0
    return out


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
    s = SessionStore.open(finished)
    with pytest.raises(store_module.StoreError, match="damaged"):
        (s.round_tensors if kind == "rounds" else s.load_surrogate)(r)
    s.close()
    if kind == "surrogate":  # resuming a finished session draws its final batch from this file
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
    s._conn.execute("DELETE FROM ratings WHERE position=1")
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
             ["--restart", "0"]]
ALL_BAD = [pytest.param(f, id=" ".join(f)) for f in BAD_FLAGS]


@pytest.mark.parametrize("flags", ALL_BAD + [pytest.param(["--prefer", "1,12"], id="--prefer 1,12")])
def test_a_bad_align_flag_is_one_line_and_writes_nothing(tmp_path, flags, capsys):
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), *TINY, *flags]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert flags[0] in line or flags[1] in line or "12" in line, line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags", ALL_BAD)
def test_a_bad_serve_flag_is_one_line_and_writes_nothing(tmp_path, flags, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    import uvicorn

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn, "run", started)
    data = tmp_path / "data"
    assert main(["serve", "--data-dir", str(data), *[x for x in TINY if x != "--seed" and x != "3"], *flags]) == 2
    one_line_error(capsys.readouterr().err)
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
    assert digests(finished) == before
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


@pytest.mark.parametrize("flags", [["--particles", "2"], ["--epochs", "0"], ["--eval-samples", "0"],
                                   ["--per-round", "0"], ["--steps", "0"]])
def test_a_bad_compare_flag_is_one_line_and_writes_nothing(tmp_path, flags, capsys):
    assert main(["compare", "--out", str(tmp_path / "c"), "--methods", "fkc,guidance", *flags]) == 2
    one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
