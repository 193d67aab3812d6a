"""⑥ SAMPLE: a round's population from FKC-SMC with the last surrogate, and the images it shows.

The population is sampled on the prior's device (sharded over torchrun's ranks when launched so),
copied to the host once, and stored with the shown positions before anyone rates them.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch

from apa import acquisition
from apa.priors.calls import counting
from apa.seeding import generator
from apa.smc.sampler import SMCResult, device_of, fkc_sample, sample_prior, zero_reward
from apa.surrogate.model import Ensemble

MICRO_BATCH = 4  # particles per network call in a sharded run on the CPU: any rank count splitting N into
#                 multiples of it gives the same networks' results, so the same session bit for bit


class RoundSampling:
    """Sampling a round: a part of :class:`apa.session.Session` (reads its store, cfg, prior, comm,
    progress and timer)."""

    def sample(self, surrogate: Ensemble | None, n: int, gen: torch.Generator, initial: torch.Tensor | None = None,
               start_step: int = 0, desc: str = "sampling") -> SMCResult:
        """FKC-SMC with the surrogate as reward (plain prior sampling before any feedback), from the
        noise end or from ``initial`` particles [n, *event] at grid point ``start_step``.

        The run lives on the prior's device (with the surrogate, ``surrogate_after(r, device)``), and so
        does its result: a round copies it to the host once, for the store and the user."""
        sc = self.cfg.sampler
        cfg = replace(sc, particles=n, beta=sc.beta if surrogate is not None else (0.0, 0.0))
        history = self.history_particles() if sc.diversity and sc.diversity_history else None
        if self.comm is not None:  # every rank runs its share of the same request
            return self.sample_sharded(self.comm.broadcast_object(sharding_request(
                cfg, surrogate, gen, history, initial, start_step, desc)))
        return fkc_sample(self.prior, self.reward(surrogate), cfg, historical=history, generator=gen,
                          initial=initial, start_step=start_step, progress=self.progress, desc=desc)

    def sample_sharded(self, request: dict[str, Any]) -> SMCResult:
        """One rank's part in sampling a population sharded over ``self.comm`` (:func:`sharding_request`
        says what rank 0 sends); every rank returns the whole result, on the host."""
        from apa.smc.distributed import sharded_sample

        dev = device_of(self.prior)
        surrogate = None
        if request["surrogate"] is not None:  # the surrogate's parameters, broadcast by rank 0 each round
            surrogate = self.new_surrogate(0)
            surrogate.load_state_dict(request["surrogate"])
            surrogate = surrogate.requires_grad_(False).to(dev)
        gen = torch.Generator().set_state(request["generator"])
        micro_batch = MICRO_BATCH if dev.type == "cpu" else None
        return sharded_sample(self.prior, self.reward(surrogate), request["cfg"], self.comm, generator=gen,
                              historical=request["historical"], initial=request["initial"],
                              start_step=request["start_step"], micro_batch=micro_batch,
                              progress=self.progress, desc=request["desc"]).cpu()

    def reward(self, surrogate: Ensemble | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sampler's reward: zero before any feedback; log P(liked | x) for the logistic surrogate;
        the mse surrogate's rating capped at ``surrogate.ceiling`` (on the [-1, 1] scale). The cap
        keeps the surrogate's noise among images it already rates as liked from being amplified by
        exp(β·r) into a collapse onto one class; log P(liked | x) saturates at 0 by itself."""
        if surrogate is None:
            return zero_reward
        ceiling = self.cfg.surrogate.ceiling
        if surrogate.loss != "mse" or ceiling is None:
            return surrogate
        return lambda z: surrogate(z).clamp(max=ceiling)

    def sample_round(self, r: int) -> None:
        """Sample round r, choose what to show, persist both (the round reaches the host once, here)."""
        seed, dev = self.cfg.session.seed, device_of(self.prior)
        surrogate = self.surrogate_after(r - 1, dev)
        n = self.cfg.sampler.particles
        k = min(self.cfg.session.per_round, self.cfg.session.budget - self.store.spent())
        m = round(self.explore_share(r) * k) if surrogate is not None else 0
        with counting() as calls:
            with self.timer("sampling"):
                res = self.sample(surrogate, n, generator(seed, r, "sample"), desc=f"sampling round {r + 1}")
            if m:
                res = self.explored(r, m, res)
        res = res.cpu()
        cand = acquisition.Candidates(res.particles[:n], res.log_weights[:n],
                                      _on_host(surrogate.rating if surrogate is not None else None, dev),
                                      _on_host(surrogate.spread if surrogate is not None else None, dev))
        shown = acquisition.select(self.cfg.session.acquisition, cand, k - m, generator(seed, r, "select"))
        shown = torch.cat([shown, torch.arange(n, n + m, dtype=shown.dtype)])
        info = {"ess": [s.ess for s in res.trace], "resampled": [s.resampled for s in res.trace],
                "unique_origins": res.trace[-1].unique_origins, "beta_used": surrogate is not None,
                "explored": m, "calls": calls.total}
        with self.timer("io"):
            self.store.save_round(r, {"particles": res.particles, "log_weights": res.log_weights, "shown": shown},
                                  shown.tolist(), info)

    def explore_share(self, r: int) -> float:
        """The share of round r's shown images drawn from the plain prior: ``explore`` in the first
        ``explore_rounds`` guided rounds (every one when none) and in as many after a detected change
        of taste, 0 otherwise."""
        sc = self.cfg.session
        guided = r - max([self.first_guided_round(), *[c + 1 for c in self.changes()]])
        return sc.explore if sc.explore_rounds is None or guided < sc.explore_rounds else 0.0

    def first_guided_round(self) -> int:
        """The first round sampled with a surrogate: the one after the first round that fitted one."""
        fitted = [row["round"] for row in self.store.rounds() if self.store.surrogate_path(row["round"]).exists()]
        return fitted[0] + 1 if fitted else len(self.store.rounds())

    def explored(self, r: int, m: int, res: SMCResult) -> SMCResult:
        """``res`` with m plain prior samples appended, weight zero (log −inf: no part of the weighted
        population), to be shown beside the tilted particles: particles [N+m, *event], log-weights [N+m]."""
        with self.timer("sampling"):
            plain = sample_prior(self.prior, m, self.cfg.sampler.steps, generator(self.cfg.session.seed, r, "explore"),
                                 batch_size=m, decode=False, config=self.cfg.sampler)
        lw = res.log_weights
        return SMCResult(torch.cat([res.particles, plain.to(res.particles)]),
                         torch.cat([lw, torch.full((m,), float("-inf"), dtype=lw.dtype, device=lw.device)]),
                         res.trace, res.log_normalizer)

    def shown_images(self, r: int) -> torch.Tensor:
        """What round r showed, decoded: [k, C, H, W] in [0, 1]."""
        t = self.store.round_tensors(r)
        with torch.no_grad():
            return self.prior.decode(t["particles"][t["shown"].long()])

    def history_particles(self) -> torch.Tensor | None:
        """All particles shown so far [H, *event] (for diversity against history)."""
        xs = [self.store.round_tensors(row["round"]) for row in self.store.rounds()]
        parts = [t["particles"][t["shown"].long()] for t in xs]
        return torch.cat(parts) if parts else None


def sharding_request(cfg: Any, surrogate: Ensemble | None, gen: torch.Generator, historical: torch.Tensor | None,
                     initial: torch.Tensor | None, start_step: int, desc: str) -> dict[str, Any]:
    """What rank 0 sends every rank to sample one population: the sampler's configuration, the
    surrogate's parameters (host copies), the generator's state and the run's tensors."""
    params = None if surrogate is None else {k: v.cpu() for k, v in surrogate.state_dict().items()}
    return {"cfg": cfg, "surrogate": params, "generator": gen.get_state(), "historical": historical,
            "initial": initial, "start_step": start_step, "desc": desc}


def _on_host(fn: Callable[[torch.Tensor], torch.Tensor] | None,
             device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``fn``, a function of particles on ``device``, called with host particles and answering on the
    host (acquisition runs once per round, on the host copy of the round that the store receives)."""
    return None if fn is None else (lambda x: fn(x.to(device)).cpu())
