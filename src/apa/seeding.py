"""One seeding scheme for every random choice: a ``torch.Generator`` per (seed, index, purpose).

The index is a round (or, for a comparison's evaluation batches, the feedback spent); the purpose
names what the randomness is for, so each choice is independent of every other one and a session
resumed after a crash draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch

_GLOBAL = threading.Lock()  # torch's global generator is one per process: one seeded use at a time

PURPOSES = {  # purpose -> (stride of the index, offset)
    # a session's choices, per round
    "sample": (101, 1), "select": (101, 2), "init": (101, 3), "fit": (101, 4), "final": (101, 5), "restart": (101, 6),
    "explore": (101, 7), "move": (101, 8), "examples": (101, 9), "search": (101, 10), "cut": (101, 11),
    "repeats": (101, 12),
    # a comparison's baselines: per round, or per feedback spent for evaluation batches
    "round": (131, 7_788), "finetune": (131, 7_789), "eval": (131, 7_790),
    # a simulated user whose taste changes: per rating (clear of the per-round ones up to 3,600 ratings)
    "drift": (137, 500_000),
}


def generator(seed: int, index: int, purpose: str) -> torch.Generator:
    """A CPU generator for (seed, index, purpose), independent of every other (seed, index, purpose)."""
    stride, offset = PURPOSES[purpose]
    return torch.Generator().manual_seed(seed * 1_000_003 + index * stride + offset)


@contextlib.contextmanager
def seeded_global(seed: int, index: int, purpose: str) -> Iterator[None]:
    """torch's global generator seeded for (seed, index, purpose) inside the block and restored after,
    for what draws from it alone (a module's weight initialisation). Threads take turns: sessions
    served in one process would otherwise race on it."""
    with _GLOBAL, torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(generator(seed, index, purpose).initial_seed()))
        yield
