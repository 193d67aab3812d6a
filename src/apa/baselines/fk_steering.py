"""FK steering (Singhal et al., ICML 2025): the prior's own kernel, particles resampled by reward potentials.

Feynman-Kac steering runs P independent populations of N particles through the prior's ancestral
sampler, unchanged (no reward gradient). At the potential steps i ∈ I (every ``resample_every``
steps from ``resample_start`` to ``resample_end``, and the last step) each particle's intermediate
reward r_i = r(ẑ0(z_i)) is read at its Tweedie estimate and its log-weight gains log G_i with

    difference:  log G_i = λ·(r_i − r_prev)                   (r_prev: the lineage's last reward)
    max:         log G_i = λ·max(r_i, M_prev),  M = running max of the lineage's rewards
    sum:         log G_i = λ·(r_i + S_prev),    S = running sum of the lineage's rewards

(the lineage's statistic starts at ``reward_min``, 0 as in the code). At the last step, max and sum
take G = exp(λ·r_final) / Π_{earlier} G along the lineage, so for every potential the product of
the potentials along a path is exp(λ·r(z_0)) and the target is p(z_0)·exp(λ·r(z_0)); with
"difference" every intermediate target is the prior tilted by the current reward. After each
intermediate potential step the population is resampled (always, as the paper's text-to-image runs
do, or only when ESS < ``ess_threshold``·N with ``adaptive``); the weights are carried forward when
it is not. Each population yields one image: the particle with the highest final reward (the
paper's text-to-image evaluation keeps the best of the k particles, the code's ``best_of_n``
samples), or with ``output="weighted"`` one drawn by the final weights.

The online loop (:func:`run_online`, shared with ``das_online``): round 0 rates plain prior samples; after
every round the reward network of ``baselines.online`` is refit on all ratings so far (particles =
images·2 − 1), and the next round's ``per_round`` images come from ``per_round`` populations steered
by it; the final sampler steers by the network fitted on the whole budget.

Settings (``FKSteeringConfig``) and departures from the paper and its code (``launch.sh``: SDXL at
100 DDIM steps, λ = 10, the max potential, resampling every 20 steps from step 20 to 80,
multinomial resampling, not adaptive; k = 4 particles, the paper's headline setting):
- the resampling grid is scaled from 100 steps to our 25: every 5 steps from 5 to 20, and the last;
- the potentials are evaluated on z_i and the population resampled *before* the move, so copies of
  an ancestor diverge at once (the code resamples the already-moved latents by the potentials of
  their parents; both are valid Feynman-Kac samplers, ours costs the same network calls);
- weights are carried forward when adaptive resampling skips a step (the code drops them, its
  issue #12), and the max/sum potentials end with exp(λ·r_0)/Π G, so that every potential targets
  p·exp(λ·r) (the code ends max with exp(λ·max of the lineage's rewards, r_0 included)/Π G, whose
  target is p·exp(λ·max_s r_s));
- systematic resampling (the house default) instead of multinomial; no resampling at the last step,
  whose weights only choose the output;
- the reward is the learned network of the online loop, read on the clipped image of ẑ0 (the code
  reads ImageReward on the decoded ẑ0, also clipped to the image range).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from apa.baselines.common import MethodRun
from apa.baselines.online import (Draw, pick_per_population, population_ess, population_images,
                                  resample_populations, run_online)
from apa.knobs import at_least, choice, finite, fraction, knob, require, whole
from apa.registry import METHODS, RESAMPLERS
from apa.smc import resampling
from apa.types import Particles

POTENTIALS = ("max", "difference", "sum")
OUTPUTS = ("best", "weighted")
Reward = Callable[[Particles], torch.Tensor]  # particles [M, *event] -> rewards [M]


@dataclass(frozen=True)
class FKSteeringConfig:
    """FK steering's settings: the code's ``launch.sh`` defaults, the grid scaled from 100 to 25 steps."""

    steps: int = knob(25, "ancestral steps (paper: 100 DDIM steps)")
    particles: int = knob(4, "particles per population, one image each (paper: k = 4)")
    lam: float = knob(10.0, "λ, the potentials' inverse temperature (code: 10)")
    potential: str = knob("max", "how a lineage's rewards make its potential: its running max, the difference to "
                          "its last reward, or its running sum (see above; launch.sh: max)", choices=POTENTIALS)
    resample_every: int = knob(5, "steps between potential steps (code: 20 of 100)")
    resample_start: int = knob(5, "first potential step (code: 20 of 100)")
    resample_end: int = knob(20, "last intermediate potential step, inclusive (code: 80 of 100); the last step "
                             "always")
    adaptive: bool = knob(False, "resample only when ESS < ess_threshold·N (launch.sh: off, always resample)")
    ess_threshold: float = knob(0.5, "the code's adaptive threshold")
    reward_min: float = knob(0.0, "the lineage statistic's start value (code: reward_min_value = 0)")
    resample: str = knob("systematic", "resampling scheme (code: multinomial)", choices=RESAMPLERS)
    output: str = knob("best", "best: highest final reward per population (paper); weighted: one drawn by weight",
                       choices=OUTPUTS)
    populations_per_call: int = knob(32, "populations run together (memory and speed; the random draws follow "
                                     "the chunks)")

    def __post_init__(self) -> None:
        choice("potential", self.potential, POTENTIALS)
        choice("output", self.output, OUTPUTS)
        for name in ("steps", "particles", "resample_every", "populations_per_call"):
            at_least(name, getattr(self, name), 1)
        require(whole(self.resample_start) and whole(self.resample_end),
                f"resample_start and resample_end must be whole step numbers, got "
                f"{self.resample_start!r}, {self.resample_end!r}")
        fraction("ess_threshold", self.ess_threshold)
        finite("lam", self.lam)
        finite("reward_min", self.reward_min)
        resampling.get_resampler(self.resample)

    def potential_steps(self) -> frozenset[int]:
        """Step indices whose potentials are evaluated: the resampling grid and the last step."""
        grid = range(self.resample_start, self.resample_end + 1, self.resample_every)
        return frozenset(i for i in grid if 0 <= i < self.steps) | {self.steps - 1}


# ---------------------------------------------------------------- one FK-steering run


@dataclass(frozen=True)
class FKState:
    """P populations of N particles at step ``step``. Shapes: particles [P·N, *event], the rest [P, N]."""

    particles: Particles
    log_weights: torch.Tensor  # float64, carried forward between resamplings
    stat: torch.Tensor  # the lineage's reward statistic: last r (difference), running max (max) or sum (sum)
    log_product: torch.Tensor  # Σ log G along the lineage so far (the max/sum final correction)
    step: int


@dataclass(frozen=True)
class FKResult:
    particles: Particles  # clean particles z_0 [P·N, *event]
    log_weights: torch.Tensor  # [P, N] normalised per population
    rewards: torch.Tensor  # [P, N] final rewards r(z_0)
    ess: list[float]  # minimum ESS over populations at each potential step (before resampling)
    resampled: int  # populations resampled, summed over steps


def potential(kind: str, lam: float, r: torch.Tensor, state: FKState, final: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """log G_i and the updated lineage statistic for rewards r [P, N] (module docstring). -> ([P, N], [P, N])."""
    if kind == "difference":
        return lam * (r - state.stat), r
    stat = torch.maximum(state.stat, r) if kind == "max" else state.stat + r
    if final:
        return lam * r - state.log_product, stat  # Π G = exp(λ·r_0)
    return lam * stat, stat


def init_fk(prior, populations: int, cfg: FKSteeringConfig, gen: torch.Generator | None) -> FKState:
    """P·N draws from the noise end, equal weights, statistics at ``reward_min``."""
    sigma0 = float(prior.sigmas(cfg.steps)[0])
    z = prior.sample_initial(populations * cfg.particles, sigma0, gen)
    zeros = torch.zeros(populations, cfg.particles, dtype=torch.float64)
    return FKState(z, zeros - math.log(cfg.particles), zeros + cfg.reward_min, zeros.clone(), 0)


def fk_step(state: FKState, prior, reward: Reward, cfg: FKSteeringConfig, sigmas: torch.Tensor,
            gen: torch.Generator | None) -> tuple[FKState, dict]:
    """Step i: ε at z_i; at a potential step reweight by G_i(r(ẑ0)) and resample; then the prior's move.

    Returns the state at step i + 1 and {"ess": min ESS [float] or None, "resampled": count,
    "rewards": r_i [P, N] or None}.
    """
    i, z = state.step, state.particles
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    p, n = state.log_weights.shape
    with torch.no_grad():
        eps = prior.eps(z, s)
    info = {"ess": None, "resampled": 0, "rewards": None}
    if i in cfg.potential_steps():
        with torch.no_grad():
            r = reward(prior.tweedie(z, s, eps)).double().view(p, n)
        log_g, stat = potential(cfg.potential, cfg.lam, r, state, final=i == cfg.steps - 1)
        state = FKState(z, state.log_weights + log_g, stat, state.log_product + log_g, i)
        ess = population_ess(state.log_weights)
        info.update(ess=float(ess.min()), rewards=r)
        if i < cfg.steps - 1:
            chosen = ess < cfg.ess_threshold * n if cfg.adaptive else torch.ones(p, dtype=torch.bool)
            idx, lw = resample_populations(state.log_weights, chosen, cfg.resample, gen)
            flat = lambda t: t.reshape(-1)[idx].view(p, n)  # noqa: E731
            state = FKState(z[idx], lw, flat(state.stat), flat(state.log_product), i)
            z, eps = state.particles, eps[idx]
            info["resampled"] = int(chosen.sum())
    noise = torch.randn(z.shape, generator=gen)
    z_next = prior.transition(z, eps, s, s_next, noise)
    return FKState(z_next, state.log_weights, state.stat, state.log_product, i + 1), info


def fk_steer(prior, reward: Reward, populations: int, cfg: FKSteeringConfig,
             gen: torch.Generator | None) -> FKResult:
    """One FK-steering run of P populations × N particles over ``cfg.steps`` steps."""
    sigmas = prior.sigmas(cfg.steps)
    state = init_fk(prior, populations, cfg, gen)
    ess, resampled, rewards = [], 0, None
    while state.step < cfg.steps:
        state, info = fk_step(state, prior, reward, cfg, sigmas, gen)
        if info["ess"] is not None:
            ess.append(info["ess"])
            rewards = info["rewards"]
        resampled += info["resampled"]
    lw = state.log_weights - torch.logsumexp(state.log_weights, dim=1, keepdim=True)
    return FKResult(state.particles, lw, rewards, ess, resampled)


# ---------------------------------------------------------------- samplers and the online loop


def image_reward(prior, model: torch.nn.Module) -> Reward:
    """The learned reward on particles [M, *event]: the network on the clipped image, particles = images·2 − 1."""
    return lambda z: model(prior.decode(z) * 2.0 - 1.0)


def fk_images(prior, reward: Reward, n: int, cfg: FKSteeringConfig, gen: torch.Generator,
              log: list | None = None) -> torch.Tensor:
    """n images [n, C, H, W] in [0, 1], one per population, in chunks of ``populations_per_call``."""
    def chosen(k: int) -> tuple[torch.Tensor, FKResult]:
        res = fk_steer(prior, reward, k, cfg, gen)
        return res.particles[pick_per_population(res.rewards, res.log_weights, cfg.output, gen)], res

    return population_images(prior, n, cfg.populations_per_call, chosen, log)


@METHODS.register("fk_steering", config=FKSteeringConfig, compare={"steps": "steps"})
def run(prior, user, budget: int, per_round: int, seed: int, *, config: FKSteeringConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """FK steering online: ``budget`` ratings in rounds of ``per_round``, each round's images steered
    by the reward network refit on all ratings so far. ``workdir`` is unused (the common signature)."""
    cfg = config or FKSteeringConfig()

    def steer(model: torch.nn.Module, x: torch.Tensor) -> tuple[Draw, Draw]:
        reward = image_reward(prior, model)
        draw: Draw = lambda n, gen, log=None: fk_images(prior, reward, n, cfg, gen, log)  # noqa: E731
        return draw, draw

    return run_online("fk_steering", prior, user, budget, per_round, seed, steer, cfg.steps,
                      checkpoints=checkpoints, eval_samples=eval_samples, info={"config": asdict(cfg)})
