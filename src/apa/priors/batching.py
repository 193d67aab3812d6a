"""Many sessions, one network call: a prior whose network calls from concurrent threads are batched.

`apa serve` runs each person's round on a worker thread, and every step of every round calls the
prior's network: ε at the particles, and the features the surrogate reads (forward, then the
backward pass for the reward's gradient). :class:`BatchingPrior` wraps one shared prior; a call
from any thread joins the calls the other threads are waiting on, and the first caller to find
nobody else running (the *leader*) makes one network call for all of them, with a timestep per
row, so sessions at different steps share it. Everything else (the surrogate's head and its
gradient, weights, resampling, noise) stays in the session's own thread.

Bits: the network's convolutions and norms work row by row, and its matrix products (the time
embedding) and GroupNorms are taken per caller (``segments``). The convolutions take images in
blocks of 4 (``BLOCK``), so calls whose row counts are multiples of 4 (a session's 32 particles)
share a batch, and any other is made on its own. Each row's output and input gradient are then
the bits of the caller's own call, whether its rows were alone in the call or beside others: tests/priors/test_batching.py checks this, and a session run beside
others against the same session alone. A prior without the split network (``eps_input`` /
``eps_network``, ``features_input`` / ``features_network``) is called directly, unbatched.

When a leader calls: as soon as every thread inside a sampling run (:meth:`BatchingPrior.running`)
is waiting, or ``window_s`` after the oldest waiting call, whichever is first.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from apa.priors.base import PriorWrapper, VEPrior
from apa.priors.calls import counted
from apa.types import Particles


BLOCK = 4  # convolutions on this CPU (oneDNN) take images in blocks of 4: a call whose rows fill whole
#           blocks keeps its bits beside others; any other call is made on its own (measured, tested)


@dataclass
class _Graph:
    """One batched features call kept for its backward pass: inputs [B, *event], outputs [B, C]."""

    x: torch.Tensor
    out: torch.Tensor
    pending: int  # rows' owners that may still ask for their gradient


@dataclass
class _Call:
    """One thread's request: ``kind`` in eps / features / grad, its tensors, and where its answer goes."""

    kind: str
    x: torch.Tensor  # network inputs [n, *event] (grad: the output gradient [n, C])
    t: torch.Tensor | None = None  # per-row timesteps [n]
    graph: _Graph | None = None  # grad: the features call whose rows these are
    rows: slice | None = None  # grad: the caller's rows in that call
    needs_grad: bool = False
    arrived: float = field(default_factory=time.perf_counter)
    result: Any = None
    error: BaseException | None = None
    done: bool = False


class Batcher:
    """Gathers the calls of concurrent threads and runs each kind of them as one network call."""

    def __init__(self, prior: Any, window_s: float = 0.01):
        self.prior, self.window_s = prior, window_s
        self.cv = threading.Condition()
        self.waiting: list[_Call] = []
        self.busy = False  # a leader is calling the network now
        self.members = 0  # threads inside a sampling run
        self.calls = self.rows = self.requests = 0  # network calls made, and the rows and requests they carried

    @contextlib.contextmanager
    def member(self) -> Iterator[None]:
        """Count the caller among the threads whose calls a leader waits for."""
        with self.cv:
            self.members += 1
        try:
            yield
        finally:
            with self.cv:
                self.members -= 1
                self.cv.notify_all()

    def submit(self, call: _Call) -> Any:
        """Wait for ``call``'s answer, leading a network call when it is this thread's turn."""
        with self.cv:
            self.waiting.append(call)
            self.cv.notify_all()
            while not call.done:
                if not self.busy and self.waiting and self._ready():
                    batch, self.waiting, self.busy = self.waiting, [], True
                    self.cv.release()
                    try:
                        self._run(batch)
                    finally:
                        self.cv.acquire()
                        self.busy = False
                        self.cv.notify_all()
                else:
                    self.cv.wait(self._timeout())
        if call.error is not None:
            raise call.error
        return call.result

    def _age(self) -> float:
        """How long the oldest waiting call has waited (seconds)."""
        return time.perf_counter() - min(c.arrived for c in self.waiting)

    def _ready(self) -> bool:
        """Every member is waiting, or the oldest call has waited out the window."""
        return len(self.waiting) >= self.members or self._age() >= self.window_s

    def _timeout(self) -> float:
        if self.busy or not self.waiting:
            return self.window_s
        return max(self.window_s - self._age(), 1e-4)

    def _run(self, batch: list[_Call]) -> None:
        """One network call per kind (and per features graph, for gradients); every call answered."""
        groups: dict[tuple, list[_Call]] = {}
        for c in batch:
            alone = c.kind != "grad" and c.x.shape[0] % BLOCK != 0  # its rows would not keep their bits beside others
            groups.setdefault((c.kind, id(c.graph), id(c) if alone else None), []).append(c)
        for (kind, *_), calls in groups.items():
            try:
                getattr(self, f"_{kind}")(calls)
            except BaseException as e:  # every waiting thread hears of it; none is stranded
                for c in calls:
                    c.error = e
            finally:
                for c in calls:
                    c.done = True

    def _count(self, calls: list[_Call]) -> None:
        self.calls += 1
        self.rows += sum(c.x.shape[0] for c in calls)
        self.requests += len(calls)

    def _eps(self, calls: list[_Call]) -> None:
        self._count(calls)
        with torch.no_grad():
            out = self.prior.eps_network(torch.cat([c.x for c in calls]), torch.cat([c.t for c in calls]),
                                         _segments(calls))
        for c, part in zip(calls, _split(out, calls)):
            c.result = part

    def _features(self, calls: list[_Call]) -> None:
        self._count(calls)
        grad = any(c.needs_grad for c in calls)
        x = torch.cat([c.x for c in calls]).detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out = self.prior.features_network(x, torch.cat([c.t for c in calls]), _segments(calls))
        graph = _Graph(x, out, sum(c.needs_grad for c in calls)) if grad else None
        start = 0
        for c in calls:
            rows = slice(start, start + c.x.shape[0])
            start = rows.stop
            c.result = (out[rows].detach(), graph if c.needs_grad else None, rows)

    def _grad(self, calls: list[_Call]) -> None:
        """Input gradients of one features call's rows: one backward pass for every caller waiting."""
        self._count(calls)
        graph = calls[0].graph
        g = torch.zeros_like(graph.out)
        for c in calls:
            g[c.rows] = c.x
        graph.pending -= len(calls)
        (dx,) = torch.autograd.grad(graph.out, graph.x, g, retain_graph=graph.pending > 0)
        for c in calls:
            c.result = dx[c.rows]
        if graph.pending <= 0:
            graph.x = graph.out = None  # the graph is freed with its last owner


def _segments(calls: list[_Call]) -> tuple[int, ...]:
    """The callers' row counts, in the order their rows sit in the batch."""
    return tuple(c.x.shape[0] for c in calls)


def _split(out: torch.Tensor, calls: list[_Call]) -> list[torch.Tensor]:
    return list(out.split(list(_segments(calls))))


class _SharedFeatures(torch.autograd.Function):
    """The features network as a batched call, differentiable in its input (the backward is batched too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t: torch.Tensor, batcher: Batcher, needs_grad: bool) -> torch.Tensor:
        out, graph, rows = batcher.submit(_Call("features", x.detach(), t, needs_grad=needs_grad))
        ctx.batcher, ctx.graph, ctx.rows = batcher, graph, rows
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        dx = ctx.batcher.submit(_Call("grad", grad_out.contiguous(), graph=ctx.graph, rows=ctx.rows))
        return dx, None, None, None


class BatchingPrior(PriorWrapper):
    """``prior`` with its network calls batched across threads (module docstring); everything else is
    the prior's own, forwarded (``PriorWrapper``). ``features`` is None when the prior has none."""

    def __init__(self, prior: VEPrior, window_s: float = 0.01):
        super().__init__(prior)
        self.batcher = Batcher(prior, window_s)
        self.model, self.sigma_of_t = prior.model, prior.sigma_of_t  # what taste pools and re-noising read
        if prior.features is not None and prior.features_network is not None:  # else the prior's own, or None
            # in shared calls; not a bound method, so no reference cycle keeps an unused wrapper alive
            self.features = functools.partial(shared_features, prior, self.batcher)

    @property
    def batches(self) -> bool:
        """Whether ε is made in shared calls: the prior's network is split from its inputs."""
        return self.inner.eps_network is not None

    def running(self) -> contextlib.AbstractContextManager:
        """Around a sampling run: the leader waits for this thread's calls too."""
        return self.batcher.member() if self.batches else contextlib.nullcontext()

    def eps(self, z: Particles, sigma: float) -> Particles:
        """ε at z [N, *event], σ: the prior's own values, computed in a shared call."""
        if not self.batches:
            return self.inner.eps(z, sigma)
        x, t = self.inner.eps_input(z, sigma)
        return counted("eps", self.batcher.submit(_Call("eps", x, t)).to(z.device))


def shared_features(prior: VEPrior, batcher: Batcher, z0: Particles, t: int = 200) -> torch.Tensor:
    """The prior's features of z0 [N, *event]: [N, C], differentiable in z0, computed in a call ``batcher``
    shares (a :class:`BatchingPrior`'s ``features``)."""
    x, tt = prior.features_input(z0, t)
    needs_grad = torch.is_grad_enabled() and x.requires_grad
    return counted("features", _SharedFeatures.apply(x, tt, batcher, needs_grad).to(z0.device))


def running(prior: Any) -> contextlib.AbstractContextManager:
    """The context a sampling run on ``prior`` holds: membership of its batcher, or nothing."""
    return prior.running() if isinstance(prior, BatchingPrior) else contextlib.nullcontext()
