"""⑥ `apa align` launched by torchrun: rank 0 runs the session, every rank samples its share.

``torchrun --nproc-per-node K -m apa align <flags>`` starts K processes with RANK and WORLD_SIZE set;
that is how a launch is detected (no flag). Rank 0 opens (or resumes) the session, asks the feedback
source, refits the surrogate and writes the store, exactly as one process would; before each
population it broadcasts a request (the sampler's configuration, the surrogate's parameters and the
generator's state: :func:`apa.session.sampler.sharding_request`) and every rank runs its N/K particles of the
same sharded run (:mod:`apa.smc.distributed`); rank 0 receives the whole population. The other ranks
hold no store and write nothing. A collective that fails or waits longer than APA_DIST_TIMEOUT
seconds (default 300) ends every rank with a one-line error; what was stored is kept, and the same
command with --resume DIR continues the session.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Callable, Iterator

import torch.distributed as dist

from apa.config import AlignConfig
from apa.registry import PRIORS
from apa.session.fitter import SurrogateFitter
from apa.session.sampler import MICRO_BATCH, RoundSampler
from apa.smc.distributed import (DEFAULT_TIMEOUT_S, Comm, DistributedError, check_shardable, init_from_env,
                                 launched)
from apa.smc.sampler import device_of

TIMEOUT_ENV = "APA_DIST_TIMEOUT"


def timeout_s() -> float:
    """Seconds a collective may wait (APA_DIST_TIMEOUT, default 300)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r} is not a positive number of seconds")
    return value


def serve(comm: Comm) -> None:
    """Ranks 1..K−1: build the prior from the configuration rank 0 sends, then take part in every
    sampling request until rank 0 sends None (the session is over, or it failed to open)."""
    cfg = comm.broadcast_object(None)
    if cfg is None:
        return
    cfg = AlignConfig.from_dict(cfg)
    prior = PRIORS.create(cfg.prior.name, vars(cfg.prior))
    sampler = RoundSampler(prior, cfg.sampler, comm, progress=False)
    fitter = SurrogateFitter(prior, cfg.surrogate, cfg.session.seed)
    while (request := comm.broadcast_object(None)) is not None:
        params = request["surrogate"]  # the surrogate's parameters, broadcast by rank 0 each round
        surrogate = None if params is None else fitter.load(0, params, device_of(prior))
        sampler.sample_shard(request, fitter.reward(surrogate))


def check_session(cfg: AlignConfig, prior: Any, world_size: int) -> None:
    """Refuse, before anything is written, a session whose populations (the rounds' and the final
    batch) do not shard over ``world_size`` processes."""
    micro_batch = MICRO_BATCH if device_of(prior).type == "cpu" else None
    for what, n in (("--particles", cfg.sampler.particles), ("--eval-samples", cfg.session.eval_samples)):
        try:
            check_shardable(replace(cfg.sampler, particles=n), world_size, micro_batch)
        except ValueError as e:
            raise ValueError(f"{what} {n} under torchrun with {world_size} processes: {e}") from e


@contextmanager
def lead(comm: Comm, open_session: Callable[[Callable, Comm], Any]) -> Iterator[Any]:
    """Rank 0: the session ``open_session(check, comm)`` opens (``check(cfg, prior)`` refuses what does
    not shard, before anything is written), its configuration sent to the other ranks; at the end
    they are told to stop (unless a collective already failed: they end by their own timeout)."""
    try:
        session = open_session(lambda cfg, prior: check_session(cfg, prior, comm.world_size), comm)
    except BaseException:
        comm.broadcast_object(None)
        raise
    comm.broadcast_object(session.cfg.to_dict())
    stop = True
    try:
        yield session
    except DistributedError:
        stop = False
        raise
    finally:
        if stop:
            comm.broadcast_object(None)


@contextmanager
def session_of(open_session: Callable[[Callable | None, Comm | None], Any]) -> Iterator[Any]:
    """The session this process runs: ``open_session(None, None)`` in one process; under torchrun rank 0's
    session (:func:`lead`), and None on the other ranks once they have served every request."""
    if not launched():
        yield open_session(None, None)
        return
    comm = init_from_env(timeout_s())
    try:
        if comm.rank != 0:
            serve(comm)
            yield None
            return
        with lead(comm, open_session) as session:
            yield session
    finally:
        dist.destroy_process_group()
