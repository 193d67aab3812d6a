"""`apa align` launched like torchrun (RANK, WORLD_SIZE, ...; gloo on the CPU): 2 processes give the same
session as 1, bit for bit (ratings, rounds, final images); a rank that dies ends the run with a one-line
error and --resume continues the session."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from apa.store import SessionStore

SRC = str(Path(__file__).resolve().parents[1] / "src")
FLAGS = ["--budget", "16", "--per-round", "4", "--particles", "8", "--steps", "4", "--eval-samples", "8",
         "--epochs", "10", "--seed", "3", "--quiet"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], extra_env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """``world`` processes of `python -m apa align args` with torchrun's environment (loopback only)."""
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = {**os.environ, "PYTHONPATH": SRC, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "OMP_NUM_THREADS": "1", **(extra_env or {})}
        procs.append(subprocess.Popen([sys.executable, "-m", "apa", "align", *args], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=240), p.communicate()[1]) for p in procs]


def record(out: Path) -> tuple:
    store = SessionStore.open(out)
    try:
        ratings = [(x["round"], x["position"], x["particle"], x["score"]) for x in store.ratings()]
        rounds = [store.round_tensors(row["round"]) for row in store.rounds()]
        return ratings, rounds, store.final_images()
    finally:
        store.close()


def test_two_processes_give_the_session_of_one(tmp_path):
    runs = {k: launch(k, ["--out", str(tmp_path / f"k{k}"), *FLAGS]) for k in (1, 2)}  # side by side
    for k, procs in runs.items():
        for rc, err in finish(procs):
            assert rc == 0, err
    (r1, t1, f1), (r2, t2, f2) = record(tmp_path / "k1"), record(tmp_path / "k2")
    assert len(r1) == 16 and r1 == r2
    for a, b in zip(t1, t2):
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert f1 is not None and torch.equal(f1, f2)
