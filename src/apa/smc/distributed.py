"""② One FKC-SMC population sharded across K processes (torch.distributed, launched by torchrun).

Each rank holds N/K particles; :func:`apa.smc.sampler.step` is the same step as in one process, with
this rank's :class:`Sharded` population over a :class:`Comm`:
  - reweight: the per-particle increments [N/K] are all-gathered into [N], so the log-weights, the
    ESS, the resampling decision and the trace are computed on the whole population, the same
    numbers on every rank as in one process;
  - resample: the ancestors [N] are drawn from the run's generator, which every rank holds in the
    same state (it is seeded from the run's seed and only ever draws what every rank draws), so
    every rank computes the same ancestors; each rank then receives the rows of its new ancestors
    (particles and the potential's pieces) from the ranks that hold them: only rows that change
    rank travel, once each, with one all_to_all per tensor (:meth:`TorchComm.take`);
  - move: the noise of step i is drawn for the whole population [N, *event] from that same generator,
    and each rank keeps its block: the noise of one process's run (:class:`Sharded` is the
    population these steps see; ``smc/population`` has the one-process one).
So a sharded run gives the same particles and weights as one process, for K = 1, 2, 4, ... bit for
bit on the CPU, as long as the networks' results do not depend on how many particles share a call:
``micro_batch`` makes every network call of a rank take ``micro_batch`` particles (it must divide
N/K), and the built-in networks give the same rows whether called on 4 particles or on all of
them (tests/session/test_ranks.py runs `apa align` both ways). The diversity term L_div couples every
particle to the population and is not sharded: a sharded run refuses it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol

import torch

from apa.config import SamplerConfig
from apa.priors.base import Prior, PriorWrapper
from apa.smc import fkc
from apa.smc.sampler import SMCResult, fkc_sample
from apa.types import Indices, Particles

DEFAULT_TIMEOUT_S = 300.0  # how long a collective may wait for a rank before the run ends with an error


class DistributedError(RuntimeError):
    """A rank died or a collective timed out; the message says what to do."""


@dataclass
class Traffic:
    """Bytes this rank sent, by what for."""

    gather: int = 0  # all-gathers of per-particle values (log-weight increments, rewards, ...)
    exchange: int = 0  # particles (and their potential pieces) sent to another rank at resampling
    collect: int = 0  # the final particles, gathered once per run for whoever uses the result


class Comm(Protocol):
    """What a sharded step needs from the other ranks. Ranks hold consecutive blocks of N/K particles."""

    rank: int
    world_size: int
    traffic: Traffic

    def all_gather(self, x: torch.Tensor, kind: str = "gather") -> torch.Tensor:
        """Every rank's rows in rank order: [N/K, ...] -> [N, ...]; the bytes count as ``kind`` in
        :class:`Traffic`."""

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's block of a whole-population tensor: [N, ...] -> [N/K, ...]."""

    def take(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        """Rows of the population for this rank's slots after resampling: x [N/K, ...] (this rank's
        block), ancestors [N] (the same on every rank) -> x_all[ancestors[block]] [N/K, ...]."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""


class LocalComm:
    """One process holding the whole population (K = 1 without torch.distributed)."""

    rank, world_size = 0, 1

    def __init__(self) -> None:
        self.traffic = Traffic()

    def all_gather(self, x: torch.Tensor, kind: str = "gather") -> torch.Tensor:
        return x

    def local(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def take(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        return x[ancestors]

    def broadcast_object(self, obj: Any) -> Any:
        return obj


class TorchComm:
    """The ranks of the default torch.distributed process group (gloo on CPUs, NCCL on GPUs).

    ``exchange``: "all_to_all" sends only the rows that change rank (the default); "all_gather"
    gathers every rank's rows and indexes them (simpler, K−1 times the traffic; for comparison)."""

    def __init__(self, exchange: str = "all_to_all") -> None:
        # torch.distributed: absent from some torch builds; loaded only by a sharded run
        import torch.distributed as dist

        if exchange not in ("all_to_all", "all_gather"):
            raise ValueError(f"exchange must be 'all_to_all' or 'all_gather', got {exchange!r}")
        self.dist, self.exchange = dist, exchange
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.traffic = Traffic()
        self._plan: tuple[Indices | None, list] = (None, [])

    def all_gather(self, x: torch.Tensor, kind: str = "gather") -> torch.Tensor:
        if self.world_size == 1:
            return x
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world_size)]
        _collective(self.dist.all_gather, out, x)
        setattr(self.traffic, kind, getattr(self.traffic, kind) + _nbytes(x) * (self.world_size - 1))
        return torch.cat(out)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // self.world_size
        return x[self.rank * n:(self.rank + 1) * n]

    def take(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        if self.exchange == "all_gather":
            full = self.all_gather(x, "exchange")
            return full[self.local(ancestors)]
        return self._all_to_all(x, ancestors)

    def _all_to_all(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        """Send each other rank the distinct rows of this block its slots descend from; rows that stay
        on their rank do not travel."""
        k, r, n = self.world_size, self.rank, x.shape[0]
        if self._plan[0] is not ancestors:  # one plan per resampling, for every tensor it moves
            self._plan = (ancestors, exchange_plan(ancestors.cpu(), n, k))
        plan = self._plan[1]  # plan[d][s]: global rows rank d needs from rank s
        send = [plan[d][r] - r * n if d != r else plan[d][r][:0] for d in range(k)]  # local rows, per rank
        recv = [plan[r][s] if s != r else plan[r][s][:0] for s in range(k)]  # global rows, per rank
        rows = torch.cat(send).to(x.device)
        out = x.new_empty((sum(int(p.shape[0]) for p in recv), *x.shape[1:]))
        _collective(self.dist.all_to_all_single, out, x[rows].contiguous(),
                    [int(p.shape[0]) for p in recv], [int(p.shape[0]) for p in send])
        self.traffic.exchange += _nbytes(x[:1]) * int(rows.shape[0])
        pool = torch.cat([x, out])  # this block, then the rows received
        where = torch.full((n * k,), -1, dtype=torch.long)
        where[torch.cat([torch.arange(r * n, (r + 1) * n), *recv])] = torch.arange(pool.shape[0])
        return pool[where[self.local(ancestors).cpu()].to(x.device)]

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        _collective(self.dist.broadcast_object_list, box, src=0)
        return box[0]


def exchange_plan(ancestors: Indices, n: int, k: int) -> list[list[Indices]]:
    """plan[d][s]: the distinct global rows [m] held by rank s (rows s·n .. s·n+n−1) that rank d's slots
    (ancestors[d·n : d·n+n]) descend from, ascending. ancestors [k·n] int64 -> k×k index tensors."""
    plan = []
    for d in range(k):
        need = torch.unique(ancestors[d * n:(d + 1) * n])  # sorted
        owner = need // n
        plan.append([need[owner == s] for s in range(k)])
    return plan


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _collective(fn, *args, **kwargs) -> None:
    """A collective whose failure (a rank gone, a timeout) ends the run with a one-line error."""
    try:
        fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DistributedError(f"a collective across the ranks failed ({first}); a rank died or did not answer "
                               "within the timeout. What was stored is kept: run the same torchrun command with "
                               "--resume DIR to continue the session") from e


class Sharded:
    """This rank's share of a population split over ``comm``'s ranks (a ``smc/population.Population``)."""

    def __init__(self, comm: Comm) -> None:
        self.comm, self.leads = comm, comm.rank == 0

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.all_gather(x)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        return self.comm.local(x)

    def take(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        return self.comm.take(x, ancestors)


class _Chunked(PriorWrapper):
    """A prior whose network ε̂ runs on micro-batches of ``size`` particles (everything else is
    ``prior``'s, forwarded by ``PriorWrapper``)."""

    def __init__(self, prior: Prior, size: int) -> None:
        super().__init__(prior)
        self._size = size

    def eps(self, z: Particles, sigma: float) -> Particles:
        return torch.cat([self.inner.eps(c, sigma) for c in z.split(self._size)])


def _chunked_reward(reward: fkc.Reward, size: int) -> fkc.Reward:
    return lambda z: torch.cat([reward(c) for c in z.split(size)])


def check_shardable(cfg: SamplerConfig, world_size: int, micro_batch: int | None) -> None:
    """Refuse what a sharded run cannot do, saying what to change."""
    if cfg.particles % world_size:
        raise ValueError(f"{cfg.particles} particles do not split over {world_size} processes; "
                         f"use a multiple of {world_size}")
    if cfg.guided and cfg.diversity:
        raise ValueError("the diversity term couples every particle to the whole population and is not sharded; "
                         "drop --diversity or run on one process")
    if micro_batch is not None and (cfg.particles // world_size) % micro_batch:
        raise ValueError(f"{cfg.particles // world_size} particles per process is not a multiple of the "
                         f"micro-batch {micro_batch}; use a multiple of {world_size * micro_batch} particles")


def sharded_sample(prior: Prior, reward: fkc.Reward, config: SamplerConfig | None, comm: Comm, *,
                   generator: torch.Generator, historical: Particles | None = None,
                   initial: Particles | None = None, start_step: int = 0, micro_batch: int | None = None,
                   progress: bool = False, desc: str = "fkc", host_sync: bool | None = None) -> SMCResult:
    """:func:`apa.smc.sampler.fkc_sample` with the population split over ``comm``'s ranks; every rank
    calls it with the same arguments (``generator`` in the same state) and every rank gets the whole
    result: particles [N, *event], log-weights [N], trace. ``initial`` [N, *event] is the whole
    population's (each rank keeps its block)."""
    cfg = config or SamplerConfig()
    check_shardable(cfg, comm.world_size, micro_batch)
    if micro_batch is not None:
        prior, reward = _Chunked(prior, micro_batch), _chunked_reward(reward, micro_batch)
    res = fkc_sample(prior, reward, cfg, generator=generator, historical=historical, initial=initial,
                     start_step=start_step, progress=progress, desc=desc, host_sync=host_sync,
                     population=Sharded(comm))
    return replace(res, particles=comm.all_gather(res.particles, "collect"))


def launched() -> bool:
    """Whether this process was started by torchrun (or with its environment): RANK and WORLD_SIZE set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_from_env(timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchComm:
    """Join the process group torchrun describes (gloo on CPUs, NCCL with one GPU per rank); every
    collective then fails after ``timeout_s`` seconds without an answer."""
    # torch.distributed: absent from some torch builds; loaded only by a sharded run
    import torch.distributed as dist

    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, ValueError, ConnectionError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DistributedError(f"could not join the torchrun process group ({first}); check MASTER_ADDR, "
                                   "MASTER_PORT and that every rank was started") from e
    return TorchComm()
