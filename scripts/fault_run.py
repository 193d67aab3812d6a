"""A fault run against `apa` from the outside: kill -9 at random moments, each kind of damage to a
session (in `apa align --resume`, `apa repair` and `apa serve`), a write-ahead log that lost its
last commit (a round completed, a budget raise, a forget point), a disk full during a combined
budget raise and change of taste, the taste-change flags (at creation, on resume, on a finished
session, twice), 100+ bad flags across align, serve and compare, two servers sharing one
--max-sessions, and connections that never finish their headers.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fault_run.py [--seed 26] [--kills 8] [--work DIR]

It drives the `apa` command line and HTTP API only, and reads sessions with sqlite3 (read-only), so
it checks the promises, not the code. Sessions are small (--budget 24 --per-round 8 --eval-samples
32). One table is printed; each run lands in one column:
  refused cleanly   exit 2 and one line `apa: error: ...` (a one-line JSON error on the web), and
                    every file as it was (no file and no directory made for a new session)
  refused after writing  refused, but a file changed or a directory appeared first
  traceback         a traceback, several lines, or another exit status
  accepted          ran (exit 0, a server that started, an HTTP 200, a connection left open)
  repaired          `apa repair` mended the damage, said what it did, and a second repair found
                    nothing left (it never says "nothing to repair" about a session resume refuses)
A kill's run is "resumed identical" when the session, resumed to its end, equals the uninterrupted
run (every rating, every tensor file's sha256, the final batch); "ratings lost" counts stored
ratings a later state no longer holds. The goal: every bad input and every damage refused cleanly,
nothing written before a refusal, nothing lost.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

SMALL = ["--budget", "24", "--per-round", "8", "--eval-samples", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ENV.pop("APA_CRASH_AFTER", None)
COLUMNS = ("refused cleanly", "refused after writing", "traceback", "accepted", "resumed identical", "repaired")
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


# ---------------------------------------------------------------- running apa


def apa(*args: str, timeout: float = 600, env: dict | None = None, code: str | None = None) -> tuple[int | None, str]:
    """(exit status, stderr) of `apa ARGS`; status None when it was still running after ``timeout`` s.
    ``code``: Python run first in the same process (to simulate a fault from inside, as the tests do)."""
    status, _, err = apa_out(*args, timeout=timeout, env=env, code=code)
    return status, err


def apa_out(*args: str, timeout: float = 600, env: dict | None = None,
            code: str | None = None) -> tuple[int | None, str, str]:
    """(exit status, stdout, stderr) of `apa ARGS` (see ``apa``)."""
    run = ["-m", "apa.cli"] if code is None else \
        ["-c", f"import sys\n{code}\nfrom apa.cli import main\nsys.exit(main(sys.argv[1:]))"]
    p = subprocess.Popen([sys.executable, *run, *args], env=env or ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err


def message_lines(err: str) -> list[str]:
    """What a person reads on stderr: progress bars and log lines of a server that started are not messages."""
    plain = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err)
    return [x for x in re.split(r"[\r\n]", plain) if x.strip() and not re.search(r"\d+%\|", x)]


def verdict(status: int | None, err: str, changed: bool) -> str:
    if status is None or status == 0:
        return "accepted"
    lines = message_lines(err)
    if "Traceback" in err or status != 2 or len(lines) != 1 or not lines[0].startswith("apa: error: "):
        return "traceback"
    return "refused after writing" if changed else "refused cleanly"


def files(root: Path) -> dict[str, str]:
    """Every file's sha256 under root (but lock files, SQLite's shared-memory index and an empty log)."""
    if not root.exists():
        return {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith((".lock", "-shm"))
            and not (p.name.endswith("-wal") and p.stat().st_size == 0)}


def every(root: Path) -> dict[str, str]:
    """Every file's sha256 under root, SQLite's -shm and -wal included (a refusal makes no file), but the lock."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "session.lock"} if root.exists() else {}


def listing(parent: Path) -> list[str]:
    """Every path under parent, but those ``files`` leaves out (a lock, SQLite's index, an empty log)."""
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*")
                  if not p.name.endswith((".lock", "-shm")) and not (p.name.endswith("-wal") and p.stat().st_size == 0))


# ---------------------------------------------------------------- reading a session (sqlite3, read-only)


def ratings(root: Path) -> list[tuple]:
    db = root / "session.sqlite"
    if not db.exists():
        return []
    with tempfile.TemporaryDirectory() as tmp:  # a copy: reading must not touch the session
        for name in ("session.sqlite", "session.sqlite-wal"):
            if (root / name).exists():
                shutil.copyfile(root / name, Path(tmp) / name)
        conn = sqlite3.connect(Path(tmp) / "session.sqlite")
        try:
            return conn.execute("SELECT round, position, particle, score FROM ratings ORDER BY round, position").fetchall()
        except sqlite3.DatabaseError:
            return []
        finally:
            conn.close()


def fingerprint(root: Path) -> dict:
    import numpy as np

    with np.load(root / "final_samples.npz") as z:
        final = hashlib.sha256(z["images"].tobytes()).hexdigest()
    tensors = {k: v for k, v in files(root).items() if k.endswith(".safetensors")}
    return {"ratings": ratings(root), "tensors": tensors, "final": final}


def lost(before: list[tuple], after: list[tuple]) -> int:
    return len(set(before) - set(after))


# ---------------------------------------------------------------- kills


def kills(work: Path, n: int, rng: random.Random, whole: dict, seconds: float) -> dict:
    """n sessions, each killed (SIGKILL) at a random moment of its creation run and, half the time, of its
    first resume too; then resumed to the end and compared with the uninterrupted run."""
    row = dict.fromkeys(COLUMNS, 0) | {"runs": 0, "lost": 0, "note": ""}
    stranded = 0
    for i in range(n):
        out = work / f"kill{i}" / "s"
        out.parent.mkdir(parents=True)
        lost_here = 0
        for k in range(1 + rng.randint(0, 1)):
            args = ["align", "--resume", str(out)] if (out / "session.sqlite").exists() else \
                ["align", "--out", str(out), *SMALL]
            before = ratings(out)
            status, _ = apa(*args, timeout=rng.uniform(2.0, 0.95 * seconds))
            lost_here += lost(before, ratings(out))
        args = ["align", "--resume", str(out)] if (out / "session.sqlite").exists() else ["align", "--out", str(out), *SMALL]
        before = ratings(out)
        status, err = apa(*args)
        stranded += len(list(out.parent.glob(".*apa-new-*")))
        row["runs"] += 1
        if status == 0:
            lost_here += lost(before, ratings(out))
            row["resumed identical"] += int(fingerprint(out) == whole)
        else:
            row[verdict(status, err, True)] += 1
        row["lost"] += lost_here
    row["note"] = f"{stranded} directories stranded"
    return row


# ---------------------------------------------------------------- damage


def flip(path: Path, at: int = -5) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


def swap(a: Path, b: Path) -> None:
    tmp = a.with_name(a.name + ".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def drop_a_rating(root: Path) -> None:
    """The first rating deleted (one the ledger recorded: the last commit may be newer than the ledger,
    the kill having fallen between the two, and is asked again on resume)."""
    conn = sqlite3.connect(root / "session.sqlite")
    conn.execute("DELETE FROM ratings WHERE rowid = (SELECT min(rowid) FROM ratings)")
    conn.commit()
    conn.close()


def damage_page(root: Path) -> None:
    """The schema page's b-tree header damaged in the database file. (A page the write-ahead log holds
    a newer copy of is never read again, so its damage loses nothing: every commit rewrites the meta
    page, so this is the page a session killed mid-round still reads from the file.)"""
    db = root / "session.sqlite"
    data = bytearray(db.read_bytes())
    for i in range(100, min(100 + 64, len(data))):
        data[i] ^= 0x5A
    db.write_bytes(bytes(data))


def rounds(root: Path, r: int) -> Path:
    return root / "rounds" / f"round_{r:04d}.safetensors"


def surrogate(root: Path, r: int) -> Path:
    return root / "surrogate" / f"round_{r:04d}.safetensors"


DAMAGE = {
    "a flipped bit in a fitted round's file": lambda s: flip(rounds(s, 0)),
    "a flipped bit in the open round's file": lambda s: flip(rounds(s, 1)),
    "a flipped bit in a surrogate file": lambda s: flip(surrogate(s, 0)),
    "a truncated round file": lambda s: rounds(s, 0).write_bytes(rounds(s, 0).read_bytes()[:100]),
    "a deleted round file": lambda s: rounds(s, 0).unlink(),
    "a deleted surrogate file": lambda s: surrogate(s, 0).unlink(),
    "two round files swapped": lambda s: swap(rounds(s, 0), rounds(s, 1)),
    "a surrogate file in a round file's place": lambda s: shutil.copyfile(surrogate(s, 0), rounds(s, 0)),
    "a deleted ledger": lambda s: (s / "session.ledger").unlink(),
    "a deleted ledger and write-ahead log": lambda s: [(s / n).unlink() for n in ("session.ledger", "session.sqlite-wal")],
    "a deleted rating and ledger": lambda s: [drop_a_rating(s), (s / "session.ledger").unlink()],
    "a deleted rating": drop_a_rating,
    "a ledger that is a list": lambda s: (s / "session.ledger").write_text("[1, 2]"),
    "a ledger whose count is text": lambda s: (s / "session.ledger").write_text('{"ratings": "8"}'),
    "a ledger that is not JSON": lambda s: (s / "session.ledger").write_text("{ratings"),
    "a flipped byte in an earlier commit of the write-ahead log":
        lambda s: flip(s / "session.sqlite-wal", (s / "session.sqlite-wal").stat().st_size // 2),
    "a damaged database page": damage_page,
}
WEB_DAMAGE = ["a flipped bit in a fitted round's file", "a flipped bit in a surrogate file", "a deleted round file",
              "two round files swapped", "a deleted ledger", "a deleted ledger and write-ahead log",
              "a ledger that is a list"]


def midway(work: Path) -> Path:
    """A session killed with round 0 fitted and round 1 sampled with 4 of its 8 ratings (nothing checkpointed)."""
    out = work / "midway" / "s"
    if out.exists():  # made once; every use copies it
        return out
    status, err = apa("align", "--out", str(out), *SMALL, env={**ENV, "APA_CRASH_AFTER": str(4 + 12 + 2 + 4)})
    assert status == 70, err[-2000:]
    return out


def align_damage(work: Path, source: Path) -> dict:
    row = dict.fromkeys(COLUMNS, 0) | {"runs": 0, "lost": 0, "note": ""}
    for i, (name, do) in enumerate(DAMAGE.items()):
        copy = work / f"damage{i}" / "s"
        shutil.copytree(source, copy)
        do(copy)
        before, kept = files(copy), ratings(copy)
        status, err = apa("align", "--resume", str(copy))
        outcome = verdict(status, err, files(copy) != before)
        row[outcome] += 1
        row["runs"] += 1
        row["lost"] += lost(kept, ratings(copy))
        if outcome != "refused cleanly":
            row["note"] += f"{name}: {outcome}. "
    return row


# ---------------------------------------------------------------- the web server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`apa serve` on a free port, in its own process group."""

    def __init__(self, data: Path, *flags: str, cwd: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.p = subprocess.Popen([sys.executable, "-m", "apa.cli", "serve", "--data-dir", str(data), "--port",
                                   str(self.port), "--log-level", "warning", *SMALL, *flags], env=ENV, cwd=cwd,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert self.p.poll() is None and time.monotonic() < deadline, "apa serve did not start"
                time.sleep(0.2)

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def wait(self, token: str, phase: str) -> dict:
        deadline = time.monotonic() + 600
        while (state := self.call("GET", f"/api/sessions/{token}")[1]).get("phase") != phase:
            assert state.get("phase") != "error" and time.monotonic() < deadline, state
            time.sleep(0.3)
        return state

    def stop(self) -> None:
        os.killpg(self.p.pid, signal.SIGKILL)
        self.p.wait()


def clean_json_error(status: int, body: dict) -> bool:
    """A refusal a client can read: a 4xx/5xx with one line of JSON error naming no path (absolute, or
    relative like the data directory's), no server file and no PID."""
    msg = body.get("error", "")
    return status >= 400 and bool(msg) and "\n" not in msg and not re.search(r"(^|[\s('\"`])/|\w/\w", msg) \
        and "pid" not in msg and "safetensors" not in msg


def web_damage(work: Path) -> dict:
    """A web session waiting for round 1's ratings; each damage, then a fresh server (on a relative
    --data-dir, which no error body may name) asked for it and sent ratings."""
    data = work / "web" / "data"
    server = Server(data)
    try:
        token = server.call("POST", "/api/sessions")[1]["token"]
        server.wait(token, "ready")
        assert server.call("POST", f"/api/sessions/{token}/rounds/0/ratings", {"ratings": [5, 1] * 4})[0] == 200
        server.wait(token, "ready")
    finally:
        server.stop()
    row = dict.fromkeys(COLUMNS, 0) | {"runs": 0, "lost": 0, "note": ""}
    for i, name in enumerate(WEB_DAMAGE):
        copy = work / f"web{i}" / "data"
        shutil.copytree(data, copy)
        DAMAGE[name](copy / token)
        before, kept = files(copy / token), ratings(copy / token)
        server = Server(Path(copy.name), cwd=copy.parent)  # a relative --data-dir: the body must not name it
        try:
            got = [server.call("GET", f"/api/sessions/{token}"),
                   server.call("POST", f"/api/sessions/{token}/rounds/1/ratings", {"ratings": [5] * 8})]
        finally:
            server.stop()
        changed = files(copy / token) != before
        if any(status == 200 for status, _ in got):
            outcome = "accepted"
        elif all(clean_json_error(*g) for g in got):
            outcome = "refused after writing" if changed else "refused cleanly"
        else:
            outcome = "traceback"
        row[outcome] += 1
        row["runs"] += 1
        row["lost"] += lost(kept, ratings(copy / token))
        if outcome != "refused cleanly":
            row["note"] += f"{name}: {outcome} {got}. "
    return row


def new_row(note: str = "") -> dict:
    return dict.fromkeys(COLUMNS, 0) | {"runs": 0, "lost": 0, "note": note}


def repair_damage(work: Path, source: Path) -> dict:
    """Each damage, then `apa repair`: it mends what it can (saying how; a second repair then finds
    nothing left) or refuses in one line, changing nothing; "nothing to repair" is never right here."""
    row = new_row()
    for i, (name, do) in enumerate(DAMAGE.items()):
        copy = work / f"repair{i}" / "s"
        shutil.copytree(source, copy)
        do(copy)
        before, kept = every(copy), ratings(copy)
        status, out, err = apa_out("repair", str(copy))
        if status == 0 and "nothing to repair" not in out:
            again, out2, _ = apa_out("repair", str(copy))
            outcome = "repaired" if again == 0 and "nothing to repair" in out2 else "accepted"
        else:
            outcome = "accepted" if status == 0 else verdict(status, err, every(copy) != before)
        row[outcome] += 1
        row["runs"] += 1
        row["lost"] += lost(kept, ratings(copy))
        if outcome not in ("refused cleanly", "repaired"):
            row["note"] += f"{name}: {outcome} ({(out + err).strip()[-200:]}). "
    return row


def database_config(root: Path) -> dict:
    """The configuration the session's database holds (read from a copy)."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("session.sqlite", "session.sqlite-wal"):
            if (root / name).exists():
                shutil.copyfile(root / name, Path(tmp) / name)
        conn = sqlite3.connect(Path(tmp) / "session.sqlite")
        try:
            return json.loads(conn.execute("SELECT value FROM meta WHERE key='config'").fetchone()[0])
        finally:
            conn.close()


def killed_after(work: Path, name: str, args: list[str], writes: int, source: Path | None = None) -> Path:
    """A session (``source`` copied, or a new one) whose `apa ARGS` was killed after its n-th durable write."""
    out = work / name / "s"
    if source is not None:
        shutil.copytree(source, out)
    status, err = apa(*[str(out) if a == "{out}" else a for a in args], env={**ENV, "APA_CRASH_AFTER": str(writes)})
    assert status == 70, err[-2000:]
    return out


def wal_damage(work: Path, finished: Path) -> dict:
    """A write-ahead log that lost its last commit (a byte of its last frame flipped), where that
    commit is not a rating: a round completed, a budget raise, a budget raise with a forget point.
    Both `apa align --resume` and `apa repair` must refuse, changing nothing."""
    sessions = {
        "a round's completion": killed_after(work, "wal0", ["align", "--out", "{out}", *SMALL], 4 + 12 + 1),
        "a budget raise": killed_after(work, "wal1", ["align", "--resume", "{out}", "--budget", "32"], 2, finished),
        "a budget raise and a forget point": killed_after(
            work, "wal2", ["align", "--resume", "{out}", "--budget", "32", "--forget-before", "2"], 2, finished)}
    row = new_row()
    for name, root in sessions.items():
        flip(root / "session.sqlite-wal", (root / "session.sqlite-wal").stat().st_size - 100)
        for command in (["align", "--resume"], ["repair"]):
            before, kept = every(root), ratings(root)
            status, err = apa(*command, str(root))
            outcome = verdict(status, err, every(root) != before)
            row[outcome] += 1
            row["runs"] += 1
            row["lost"] += lost(kept, ratings(root))
            if outcome != "refused cleanly":
                row["note"] += f"{name}, `apa {command[0]}`: {outcome} ({err.strip()[-200:]}). "
    return row


def mount_tmpfs(path: Path, size: int) -> bool:
    """A tmpfs of ``size`` bytes at ``path`` (root only); False where it cannot be mounted."""
    path.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def fill(disk: Path, free: int) -> None:
    """Leave ``free`` bytes free on the disk at ``disk``."""
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(disk).free - free))


def consistent(root: Path, budget: int, forget: int) -> str:
    """'' when the database and config.json agree and hold both changes or neither, and no *.tmp is left."""
    db, text = database_config(root)["session"], json.loads((root / "config.json").read_text())["session"]
    both = (db["budget"], db.get("forget_before")) in ((budget, forget), (24, None))
    leftovers = [p.name for p in root.rglob("*.tmp")]
    return "" if db == text and both and not leftovers else f"database {db['budget']}/{db.get('forget_before')}, " \
        f"config.json {text['budget']}/{text.get('forget_before')}, left {leftovers}"


FULL_CODE = """import errno, os
real, calls = os.write, [0]
def write(fd, data):
    calls[0] += 1
    if calls[0] >= {n}:
        raise OSError(errno.ENOSPC, "No space left on device")
    return real(fd, data)
os.write = write"""


def full_disk(work: Path, finished: Path) -> dict:
    """`apa align --resume S --budget 32 --forget-before 2` on a finished session on a nearly full disk
    (a tmpfs with 4 to 64 KB free; where no tmpfs can be mounted, ENOSPC from the n-th file write, as the
    tests simulate it): refused in one line saying the disk is full with nothing changed, or, with room
    for the change itself, both changes stored whole (database and config.json) before space ran out."""
    row, size = new_row(), sum(p.stat().st_size for p in finished.rglob("*") if p.is_file()) + (2 << 20)
    disk = work / "tmpfs"
    real = mount_tmpfs(disk, size)
    cases = [4, 8, 16, 24, 40, 64] if real else [1, 2, 3]
    row["note"] = f"a {size >> 10} KB tmpfs with N KB free, N in {cases}" if real else \
        f"no tmpfs (not root): ENOSPC from the n-th file write, n in {cases}"
    try:
        for n in cases:
            copy = disk / f"s{n}" if real else work / f"full{n}" / "s"
            shutil.copytree(finished, copy)
            if real:
                fill(disk, n << 10)
            before = every(copy)
            status, err = apa("align", "--resume", str(copy), "--budget", "32", "--forget-before", "2",
                              code=None if real else FULL_CODE.format(n=n))
            if real:
                (disk / "filler").unlink()
            outcome = verdict(status, err, every(copy) != before)
            lines = message_lines(err)
            said = lines[-1] if lines else ""
            wrong = consistent(copy, 32, 2) or ("" if "disk is full" in said else f"said: {said[-150:]}")
            if outcome == "refused after writing" and not wrong:
                outcome = "accepted"
                row["note"] += f"; {n}: both changes stored whole, then the disk filled (said so)"
            elif wrong:
                row["note"] += f"; {n}: {wrong}"
            row[outcome] += 1
            row["runs"] += 1
            shutil.rmtree(copy)
    finally:
        if real:
            subprocess.run(["umount", str(disk)], check=False)
    return row


TINY = ["--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "4", "--eval-samples", "8"]


def taste_changes(work: Path, finished: Path, source: Path) -> dict:
    """The taste-change flags: at creation (refused: a new session has no rounds), on a finished session
    (refused unless the budget is raised too), on a session mid-way, twice (a second change keeps the
    first; one going back before it is refused), and a huge --window (accepted without a warning)."""
    new = lambda name: str(work / name / "s")  # noqa: E731
    copy = lambda src, name: shutil.copytree(src, work / name / "s")  # noqa: E731
    done, midway_copy, twice = copy(finished, "taste-done"), copy(source, "taste-mid"), copy(finished, "taste-twice")
    cases = [  # (arguments, what must stay as it is, expected)
        (["align", "--out", new("c1"), *SMALL, "--forget-before", "3"], work, "refused"),
        (["align", "--out", new("c2"), *SMALL, "--forget-before", "99999999999999999999"], work, "refused"),
        (["serve", "--data-dir", new("c3"), *SMALL, "--forget-before", "3"], work, "refused"),
        (["align", "--resume", str(done), "--forget-before", "2"], done, "refused"),
        (["align", "--resume", str(done), "--forget-before", "4"], done, "refused"),
        (["align", "--resume", str(done), "--forget-before", "5"], done, "refused"),
        (["align", "--resume", str(done), "--budget", "32", "--forget-before", "0"], done, "refused"),
        (["align", "--resume", str(midway_copy), "--forget-before", "2"], midway_copy, "accepted"),
        (["align", "--resume", str(twice), "--budget", "32", "--forget-before", "4"], twice, "accepted"),
        (["align", "--resume", str(twice), "--budget", "40", "--forget-before", "2"], twice, "refused"),
        (["align", "--resume", str(twice), "--budget", "40", "--forget-before", "5"], twice, "accepted"),
        (["align", "--out", new("w"), *TINY, "--window", "99999999999999999999"], work, "accepted")]
    row = new_row()
    for args, keep, expected in cases:
        before = every(keep) if keep != work else listing(work)
        status, err = apa(*args, timeout=60 if args[0] == "serve" else 600)
        after = every(keep) if keep != work else listing(work)
        outcome = verdict(status, err, after != before)
        if outcome == "accepted" and "Warning" in err:
            outcome = "traceback"
        row[outcome] += 1
        row["runs"] += 1
        if outcome != ("refused cleanly" if expected == "refused" else "accepted"):
            row["note"] += f"{' '.join(args)[-70:]}: {outcome} ({err.strip()[-150:]}). "
    report = json.loads((twice / "report.json").read_text())
    marks = [r["round"] + 1 for r in report["rounds"] if r["taste_changed"]]
    row["note"] += f"the session changed twice reports its changes at rounds {marks} (expected [4, 5])"
    return row


def shared_limit(work: Path) -> dict:
    """Two servers on one data directory, --max-sessions 3 each; 10 creates at once, 5 to each."""
    data = work / "limit" / "data"
    servers = [Server(data, "--max-sessions", "3") for _ in range(2)]
    results: list[tuple[int, dict]] = []
    try:
        barrier = threading.Barrier(10)

        def create(s: Server) -> None:
            barrier.wait()
            results.append(s.call("POST", "/api/sessions"))

        threads = [threading.Thread(target=create, args=(servers[i % 2],)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in servers:
            s.stop()
    made = sum(1 for p in data.iterdir() if TOKEN.fullmatch(p.name))
    row = dict.fromkeys(COLUMNS, 0) | {"runs": 10, "lost": 0, "note": f"{made} sessions on disk (limit 3)"}
    row["accepted"] = sum(status == 201 for status, _ in results)
    row["refused cleanly"] = sum(status == 503 and clean_json_error(status, body) for status, body in results)
    row["traceback"] = 10 - row["accepted"] - row["refused cleanly"]
    return row


def slow_clients(work: Path, n: int = 50) -> dict:
    """n connections that send nothing and n that never finish their headers: closed by the server?"""
    server = Server(work / "slow" / "data")
    socks = []
    try:
        for i in range(2 * n):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            if i % 2:
                s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: 1")
            socks.append(s)
        time.sleep(15)  # the header deadline is 10 s
        closed = 0
        for s in socks:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
    finally:
        for s in socks:
            s.close()
        server.stop()
    return dict.fromkeys(COLUMNS, 0) | {"runs": 2 * n, "lost": 0, "refused cleanly": closed,
                                        "accepted": 2 * n - closed, "note": "closed within 15 s / left open"}


# ---------------------------------------------------------------- bad flags


def bad_flags(work: Path, finished: Path) -> list[tuple[str, list[str], Path]]:
    """(command, arguments, what must stay as it is) for each bad command line."""
    import torch

    work.mkdir(parents=True)
    text = work / "notes.txt"
    text.write_text("not a session\n")
    full = work / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine\n")
    no_cuda = [] if torch.cuda.is_available() else [["--device", "cuda"]]
    config = [["--budget", "0"], ["--budget", "-1"], ["--budget", "nan"], ["--budget", "2.5"], ["--budget", "2"],
              ["--per-round", "0"], ["--per-round", "ten"], ["--particles", "0"], ["--particles", "4"],
              ["--particles", "1000000000000"], ["--particles", "x"], ["--steps", "0"], ["--steps", "ten"],
              ["--steps", "1000000000000"], ["--steps", "5000"], ["--eval-samples", "1"], ["--eval-samples", "0"],
              ["--eval-samples", "1000000000000"], ["--seed", "-1"], ["--seed", "1180591620717411303424"],
              ["--seed", "abc"], ["--epochs", "0"], ["--ensemble", "0"], ["--fit-batch-size", "0"], ["--lr", "nan"],
              ["--lr", "-1"], ["--lr", "inf"], ["--feature-t", "5000"], ["--feature-t", "-1"], ["--ceiling", "inf"],
              ["--surrogate", "bogus"], ["--acquisition", "bogus"], ["--mode", "bogus"], ["--temperature", "0"],
              ["--label-noise", "0.5"], ["--label-noise", "-0.1"], ["--prefer", "1,12"], ["--prefer", "1,1"],
              ["--prefer", ""], ["--prior", "gmm"], ["--prior", "bogus"], ["--prior-weights", "/etc/passwd"],
              ["--prior-weights", str(work / "none.safetensors")], ["--prior-weights", str(full)],
              ["--device", "bogus"], ["--device", "cuda:99"], *no_cuda, ["--beta", "nan,8"], ["--beta", "1"],
              ["--beta", "a,b"], ["--gamma", "a,b"], ["--gamma", "inf,0"], ["--ess-threshold", "2"],
              ["--resample", "bogus"], ["--weights", "bogus"], ["--jacobian", "bogus"], ["--reward-at", "bogus"],
              ["--clamp", "0"], ["--beta-dot", "nan"], ["--explore", "2"], ["--restart", "0"], ["--restart", "2"],
              ["--final-start", "bogus"], ["--init", "bogus"], ["--height", "7"], ["--guidance-scale", "nan"],
              ["--dtype", "fp8"], ["--sd-batch-size", "0"], ["--cuda-graphs", "true"], ["--diversity", "maybe"],
              ["--bogus-flag", "1"], ["--forget-before", "3"], ["--drift-span", "4"],
              ["--drift-to", "2,,3", "--drift-at", "4"], ["--drift-to", "9,7,4,1", "--drift-at", "4"],
              ["--drift-to", "0,1,2,3,4,5,6,7,8,9", "--drift-at", "4"],
              ["--drift-to", "2", "--drift-at", "8", "--drift-span", "100"], ["--drift-to", "2", "--drift-at", "0"]]
    cases = []
    for i, flags in enumerate(config + [["--feedback", "human"], ["--feedback", "bogus"], ["--prefer", "-3"],
                                        ["--oracle-weights", "/etc/passwd"]]):
        out = work / f"align{i}"
        out.mkdir()
        cases.append(("align", ["align", "--out", str(out / "s"), *SMALL, *flags], out))
    cases += [("align", ["align"], work / "full"), ("align", ["align", "--out", str(text), *SMALL], text),
              ("align", ["align", "--out", str(full), *SMALL], full)]
    for flags in (["--steps", "3"], ["--budget", "16"], ["--budget", "nan"], ["--out", str(work / "x")],
                  ["--prefer", "0"], ["--preset", "seed"]):
        cases.append(("align", ["align", "--resume", str(finished), *flags], finished))
    cases += [("align", ["align", "--resume", str(work / "nowhere")], work / "full"),
              ("align", ["align", "--resume", str(text)], text), ("align", ["align", "--resume", str(full)], full),
              ("repair", ["repair", str(full)], full), ("repair", ["repair", str(text)], text)]
    serve = [f for f in config if f[0] not in ("--budget", "--per-round") or f[1] not in ("2.5", "2")][::3] + [
        ["--port", "-1"], ["--port", "70000"], ["--port", "0"], ["--port", "x"], ["--host", "nosuch.invalid"],
        ["--host", "999.1.1.1"], ["--workers", "0"], ["--workers", "-1"], ["--max-sessions", "0"],
        ["--max-sessions", "-5"], ["--feedback", "oracle"], ["--log-level", "bogus"], ["--port", "in-use"]]
    for i, flags in enumerate(serve):
        out = work / f"serve{i}"
        out.mkdir()
        cases.append(("serve", ["serve", "--data-dir", str(out / "data"), *SMALL, *flags], out))
    cases.append(("serve", ["serve", "--data-dir", str(text), *SMALL], text))
    compare = [["--threads", "-2"], ["--threads", "0"], ["--methods", ""], ["--methods", "bogus"],
               ["--papa-lr", "nan"], ["--papa-lr", "0"], ["--refine-t", "5000"], ["--refine-t", "0"],
               ["--prior-weights", "/etc/passwd"], ["--seeds", "0"], ["--seeds", "two"], ["--budgets", "0"],
               ["--budgets", "a"], ["--per-round", "0"], ["--eval-samples", "1"], ["--particles", "0"],
               ["--particles", "1000000000000"], ["--steps", "0"], ["--epochs", "0"], ["--papa-timesteps", "0"],
               ["--prefer", "12"], ["--prior", "bogus"]]
    for i, flags in enumerate(compare):
        out = work / f"compare{i}"
        out.mkdir()
        cases.append(("compare", ["compare", "--out", str(out / "c"), "--methods", "fkc,papa,best_of_n,guidance",
                                  *flags] if flags[0] != "--methods" else ["compare", "--out", str(out / "c"), *flags],
                      out))
    return cases


def run_bad_flags(cases: list[tuple[str, list[str], Path]]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    for command, args, keep in cases:
        args = [str(holder.getsockname()[1]) if a == "in-use" else a for a in args]
        before = (files(keep), listing(keep) if keep.is_dir() else None)
        status, err = apa(*args, timeout=30 if command in ("serve", "compare") else 300)
        after = (files(keep), listing(keep) if keep.is_dir() else None)
        row = rows.setdefault(command, dict.fromkeys(COLUMNS, 0) | {"runs": 0, "lost": 0, "note": ""})
        outcome = verdict(status, err, after != before)
        row[outcome] += 1
        row["runs"] += 1
        if outcome != "refused cleanly":
            row["note"] += f"{' '.join(args[1:])[-60:]}: {outcome}. "
    holder.close()
    return rows


# ---------------------------------------------------------------- the table


def table(rows: list[tuple[str, dict]]) -> str:
    head = ["fault", "runs", *COLUMNS, "ratings lost", "note"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]
    for name, r in rows:
        lines.append("| " + " | ".join([name, str(r["runs"]), *(str(r[c]) for c in COLUMNS), str(r["lost"]),
                                        r["note"].strip() or "-"]) + " |")
    total = {c: sum(r[c] for _, r in rows) for c in (*COLUMNS, "runs", "lost")}
    lines.append("| **all** | " + " | ".join(str(total[c]) for c in ("runs", *COLUMNS, "lost")) + " | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=26, help="seeds the kill moments (default: 26)")
    ap.add_argument("--kills", type=int, default=8, help="sessions killed at random moments (default: 8)")
    ap.add_argument("--work", help="where the sessions go (default: a temporary directory, removed after)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="apa-fault-run-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.perf_counter()
    whole_dir = work / "whole" / "s"
    status, err = apa("align", "--out", str(whole_dir), *SMALL)
    assert status == 0, err[-2000:]
    seconds = time.perf_counter() - t0
    whole = fingerprint(whole_dir)
    print(f"uninterrupted run: {seconds:.0f} s; {len(whole['ratings'])} ratings", flush=True)
    rows = []
    rows.append((f"kill -9 at a random moment ({args.kills} sessions, some killed twice), then --resume",
                 kills(work, args.kills, rng, whole, seconds)))
    print("kills done", flush=True)
    rows.append((f"damage, then `apa align --resume` ({len(DAMAGE)} kinds)", align_damage(work, midway(work))))
    rows.append((f"damage, then `apa repair` ({len(DAMAGE)} kinds)", repair_damage(work, midway(work))))
    rows.append((f"damage, then `apa serve` asked for the session and sent ratings ({len(WEB_DAMAGE)} kinds)",
                 web_damage(work)))
    print("damage done", flush=True)
    finished = work / "finished" / "s"
    shutil.copytree(whole_dir, finished)
    rows.append(("a write-ahead log that lost its last commit (not a rating), then `apa align --resume` and "
                 "`apa repair`", wal_damage(work, finished)))
    rows.append(("a full disk during `--resume --budget 32 --forget-before 2` of a finished session",
                 full_disk(work, finished)))
    rows.append(("the taste-change flags: at creation, on a finished session, mid-way, twice; a huge --window",
                 taste_changes(work / "taste", finished, midway(work))))
    print("new surfaces done", flush=True)
    for command, row in run_bad_flags(bad_flags(work / "flags", finished)).items():
        rows.append((f"bad command lines: `apa {command}`", row))
    print("bad flags done", flush=True)
    rows.append(("two `apa serve` on one data dir, --max-sessions 3 each, 10 creates at once", shared_limit(work)))
    rows.append(("connections that send nothing, or never finish their headers", slow_clients(work)))
    print(f"\n{table(rows)}\n\n{time.perf_counter() - t0:.0f} s in all; sessions under {work}"
          if args.work else f"\n{table(rows)}\n\n{time.perf_counter() - t0:.0f} s in all")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
