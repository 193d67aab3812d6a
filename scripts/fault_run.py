"""A fault run against `apa` from the outside: kill -9 at random moments, each kind of damage to a
session (in `apa align --resume` and in `apa serve`), 100+ bad flags across align, serve and
compare, two servers sharing one --max-sessions, and connections that never finish their headers.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/fault_run.py [--seed 26] [--kills 8] [--work DIR]

It drives the `apa` command line and HTTP API only, and reads sessions with sqlite3 (read-only), so
it checks the promises, not the code. Sessions are small (--budget 24 --per-round 8 --eval-samples
32). One table is printed; each run lands in one column:
  refused cleanly   exit 2 and one line `apa: error: ...` (a one-line JSON error on the web), and
                    every file as it was (no file and no directory made for a new session)
  refused after writing  refused, but a file changed or a directory appeared first
  traceback         a traceback, several lines, or another exit status
  accepted          ran (exit 0, a server that started, an HTTP 200, a connection left open)
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
COLUMNS = ("refused cleanly", "refused after writing", "traceback", "accepted", "resumed identical")
TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")


# ---------------------------------------------------------------- running apa


def apa(*args: str, timeout: float = 600, env: dict | None = None) -> tuple[int | None, str]:
    """(exit status, stderr) of `apa ARGS`; status None when it was still running after ``timeout`` s."""
    p = subprocess.Popen([sys.executable, "-m", "apa.cli", *args], env=env or ENV, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
        return p.returncode, err
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        _, err = p.communicate()
        return None, err


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
    db = root / "session.sqlite"
    data = bytearray(db.read_bytes())
    for i in range(4096, min(4096 + 64, len(data))):
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

    def __init__(self, data: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.p = subprocess.Popen([sys.executable, "-m", "apa.cli", "serve", "--data-dir", str(data), "--port",
                                   str(self.port), "--log-level", "warning", *SMALL, *flags], env=ENV,
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
    """A refusal a client can read: a 4xx/5xx with one line of JSON error naming no absolute path or PID."""
    msg = body.get("error", "")
    return status >= 400 and bool(msg) and "\n" not in msg and not re.search(r"(^|[\s('\"`])/", msg) \
        and "pid" not in msg


def web_damage(work: Path) -> dict:
    """A web session waiting for round 1's ratings; each damage, then a fresh server asked for it and sent ratings."""
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
        server = Server(copy)
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
              ["--bogus-flag", "1"]]
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
    rows.append((f"damage, then `apa serve` asked for the session and sent ratings ({len(WEB_DAMAGE)} kinds)",
                 web_damage(work)))
    print("damage done", flush=True)
    finished = work / "finished" / "s"
    shutil.copytree(whole_dir, finished)
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
