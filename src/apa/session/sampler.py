"""⑥ SAMPLE: a round's population from FKC-SMC with the last surrogate, and the images it shows.

The population is sampled on the prior's device (sharded over torchrun's ranks when launched so),
copied to the host once, and stored with the shown positions before anyone rates them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from apa.config import SamplerConfig
from apa.seeding import generator
from apa.session import acquisition
from apa.session.final import Cut, with_cut
from apa.smc.distributed import Comm, sharded_sample
from apa.smc.sampler import SMCResult, device_of, fkc_sample, sample_prior
from apa.surrogate.model import Ensemble

MICRO_BATCH = 4  # particles per network call in a sharded run on the CPU: any rank count splitting N into
#                 multiples of it gives the same networks' results, so the same session bit for bit


class RoundSampler:
    """Draws a session's populations: the frozen ``prior``, the sampler's configuration, and the
    population's ranks (``comm``: a torchrun launch's, or None for one process). Rank 0's sampler
    sends every request to the other ranks, whose samplers run their share (:meth:`sample_shard`)."""

    def __init__(self, prior, cfg: SamplerConfig, comm: Comm | None = None, progress: bool = True):
        self.prior, self.cfg, self.comm, self.progress = prior, cfg, comm, progress
        self.reads_history = cfg.diversity and cfg.diversity_history  # L_div against the particles shown before

    def sample(self, reward: Callable, surrogate: Ensemble | None, n: int, gen: torch.Generator, *,
               history: torch.Tensor | None = None, initial: torch.Tensor | None = None, start_step: int = 0,
               desc: str = "sampling", beta_end: float | None = None, cut: Cut | None = None,
               reweight_every: int | None = None) -> SMCResult:
        """FKC-SMC with ``reward`` (the surrogate's; plain prior sampling before any feedback, surrogate
        None) from the noise end or from ``initial`` particles [n, *event] at grid point ``start_step``;
        ``history``: particles shown before [H, *event] (diversity against history); ``beta_end``: the tilt's
        β at the end of this run (None: the sampler's); ``cut``: the final batch's cut of the tilt (``--final-cut``);
        ``reweight_every``: this run's ``--reweight-every`` (None: the sampler's).

        The run lives on the prior's device, and so does its result; a sharded run returns it on the host."""
        beta = self.cfg.beta if beta_end is None else (self.cfg.beta[0], beta_end)
        cfg = replace(self.cfg, particles=n, beta=beta if surrogate is not None else (0.0, 0.0),
                      reweight_every=self.cfg.reweight_every if reweight_every is None else reweight_every)
        if self.comm is not None:  # every rank runs its share of the same request
            request = {**sharding_request(cfg, surrogate, gen, history, initial, start_step, desc), "cut": cut}
            return self.sample_shard(self.comm.broadcast_object(request), reward)
        return fkc_sample(self.prior, with_cut(reward, cut), cfg, historical=history, generator=gen, initial=initial,
                          start_step=start_step, progress=self.progress, desc=desc)

    def sample_shard(self, request: dict[str, Any], reward: Callable) -> SMCResult:
        """One rank's part in sampling a population sharded over ``comm`` (:func:`sharding_request` says
        what rank 0 sends; ``reward``: the surrogate rebuilt from it); every rank returns the whole
        result, on the host."""
        micro_batch = MICRO_BATCH if device_of(self.prior).type == "cpu" else None
        gen = torch.Generator().set_state(request["generator"])
        return sharded_sample(self.prior, with_cut(reward, request.get("cut")), request["cfg"], self.comm,
                              generator=gen, historical=request["historical"], initial=request["initial"],
                              start_step=request["start_step"], micro_batch=micro_batch,
                              progress=self.progress, desc=request["desc"]).cpu()

    def plain(self, m: int, gen: torch.Generator) -> torch.Tensor:
        """m plain prior samples, clean particles [m, *event] (what a round shows beside the tilted ones)."""
        return sample_prior(self.prior, m, self.cfg.steps, gen, batch_size=m, decode=False, config=self.cfg)


def sharding_request(cfg: SamplerConfig, surrogate: Ensemble | None, gen: torch.Generator,
                     historical: torch.Tensor | None, initial: torch.Tensor | None, start_step: int,
                     desc: str) -> dict[str, Any]:
    """What rank 0 sends every rank to sample one population: the sampler's configuration, the
    surrogate's parameters (host copies), the generator's state and the run's tensors."""
    params = None if surrogate is None else {k: v.cpu() for k, v in surrogate.state_dict().items()}
    return {"cfg": cfg, "surrogate": params, "generator": gen.get_state(), "historical": historical,
            "initial": initial, "start_step": start_step, "desc": desc}


def with_explored(res: SMCResult, plain: torch.Tensor) -> SMCResult:
    """``res`` with m plain prior samples [m, *event] appended, weight zero (log −inf: no part of the
    weighted population), to be shown beside the tilted particles: particles [N+m, *event], log-weights [N+m]."""
    lw, m = res.log_weights, plain.shape[0]
    return SMCResult(torch.cat([res.particles, plain.to(res.particles)]),
                     torch.cat([lw, torch.full((m,), float("-inf"), dtype=lw.dtype, device=lw.device)]),
                     res.trace, res.log_normalizer)


def choose_shown(name: str, res: SMCResult, n: int, k: int, m: int, surrogate: Ensemble | None,
                 device: torch.device, seed: int, r: int) -> torch.Tensor:
    """The positions round r shows [k + m]: k of the n weighted particles chosen by the acquisition
    ``name`` (host copy ``res``), then the m explored ones appended after them."""
    cand = acquisition.Candidates(res.particles[:n], res.log_weights[:n],
                                  _on_host(surrogate.rating if surrogate is not None else None, device),
                                  _on_host(surrogate.spread if surrogate is not None else None, device))
    shown = acquisition.select(name, cand, k, generator(seed, r, "select"))
    return torch.cat([shown, torch.arange(n, n + m, dtype=shown.dtype)])


def _on_host(fn: Callable[[torch.Tensor], torch.Tensor] | None,
             device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``fn``, a function of particles on ``device``, called with host particles and answering on the
    host (acquisition runs once per round, on the host copy of the round that the store receives)."""
    return None if fn is None else (lambda x: fn(x.to(device)).cpu())
