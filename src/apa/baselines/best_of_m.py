"""Learned-reward best-of-M: the practitioner's alternative to steering.

Spend the ratings as best-of-N does (each round rates fresh plain prior samples: the same images,
from the same seeds), fit the session's own surrogate to them (features of the prior's denoiser,
the logistic loss, the session's fitting settings and initialisation), then draw M fresh plain prior
samples and keep what the learned reward ranks best:

- ``best_of_m``: the n highest-scoring of the M (each image at most once);
- ``best_of_m_is``: n draws importance-resampled by exp(β·r), the target the aligned sampler aims at,
  reached by plain sampling and reweighting (repeats when the weights are uneven).

M defaults to the pool whose network calls equal the default final batch's: 256 images of FKC-SMC
cost 22,785 call rows (ε, features and the reward's gradient at each of 25 steps, 19,201; then one sweep
of the move, 3,584; ``apa.priors.calls``, measured 2026-12-07); a plain sample costs 25 ε rows and one
features row to score, so M = 22,785 / 26 ≈ 876 for 256 images, scaled with n. The final batch's later
passes (``--final-repeats``) cost what the batch needs; the benchmarks compare at the whole session's calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from apa.baselines.common import (Clock, CountingUser, MethodRun, RoundRecord, check_checkpoints, round_sizes,
                                  to_targets)
from apa.baselines.online import refit
from apa.knobs import at_least, choice, knob, non_negative, positive
from apa.registry import METHODS
from apa.seeding import generator
from apa.smc import resampling
from apa.smc.sampler import sample_prior

DEFAULT_FINAL_ROWS_PER_IMAGE = 22785 / 256  # the default final batch's call rows per image (measured; one sweep)
SCORE_CHUNK = 256
LOSSES = ("mse", "logistic")  # the session's surrogate losses (``config.SurrogateConfig.loss``)


@dataclass(frozen=True)
class BestOfMConfig:
    """Best-of-M's settings."""

    steps: int = knob(25, "ancestral steps of every plain prior sample")
    pool_per_image: float | None = knob(None, "M / n (none: equal network calls to the default final batch)")
    beta: float = knob(2.0, "best_of_m_is: the tilt exp(β·r) (the default's β_end)")
    loss: str = knob("logistic", "the surrogate's loss (the session's default; see SurrogateConfig.loss)",
                     choices=LOSSES)

    def __post_init__(self) -> None:
        at_least("steps", self.steps, 1)
        if self.pool_per_image is not None:
            positive("pool_per_image", self.pool_per_image)
        non_negative("beta", self.beta)
        choice("loss", self.loss, LOSSES)

    def pool(self, n: int) -> int:
        """M for a batch of n images: equal network calls to FKC-SMC's default final batch unless set."""
        per = self.pool_per_image or DEFAULT_FINAL_ROWS_PER_IMAGE / (self.steps + 1)
        return max(n, round(per * n))


@torch.no_grad()
def pool_scores(prior, reward, m: int, steps: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """m fresh plain prior particles [m, *event] and their learned reward [m]."""
    z = sample_prior(prior, m, steps, gen, batch_size=256, decode=False)
    return z, torch.cat([reward(part).reshape(-1).double() for part in z.split(SCORE_CHUNK)])


def choose(scores: torch.Tensor, n: int, how: str, beta: float, gen: torch.Generator) -> torch.Tensor:
    """Indices [n] into a scored pool [M]: the n best ("top"), or n systematic draws ∝ exp(β·r) ("resample")."""
    if how == "top":
        return torch.argsort(-scores, stable=True)[:n]
    return resampling.get_resampler("systematic")(gen, torch.log_softmax(beta * scores, 0), n)


def _run(how: str, prior, user, budget: int, per_round: int, seed: int, config: BestOfMConfig | None,
         checkpoints: Sequence[int], eval_samples: int) -> MethodRun:
    cfg = config or BestOfMConfig()
    checks = check_checkpoints(checkpoints, budget, per_round)
    user = CountingUser(user)
    clock, records, batches, spent, xs, ys = Clock(), [], {}, 0, [], []
    sizes = round_sizes(budget, per_round)
    reward = None
    for r, k in enumerate(sizes):
        t0 = clock.seconds()
        z = sample_prior(prior, k, cfg.steps, generator(seed, r, "round"), batch_size=64, decode=False)
        images = prior.decode(z)  # the same images best-of-N rates (plain_samples' seeds and batches)
        rated = user(images).float()
        xs.append(z)
        ys.append(rated)
        spent += k
        if spent in checks or r == len(sizes) - 1:  # the reward is only read by a batch
            reward = refit(prior, torch.cat(xs), to_targets(torch.cat(ys), user), seed, r, cfg.loss)
        records.append(RoundRecord(r, spent, tuple(rated.tolist()), images, clock.seconds() - t0))
        if spent in checks:
            batches[spent] = clock.evaluate(spent, lambda: draw(prior, reward, eval_samples, cfg, how,
                                                                generator(seed, spent, "eval")))
    final = reward
    return MethodRun(f"best_of_m{'_is' if how == 'resample' else ''}", tuple(records), batches,
                     lambda n, gen: draw(prior, final, n, cfg, how, gen), clock.seconds(), clock.eval_seconds,
                     user.rated, eval_calls=clock.eval_calls,
                     info={"config": asdict(cfg), "pool": cfg.pool(eval_samples)})


def draw(prior, reward, n: int, cfg: BestOfMConfig, how: str, gen: torch.Generator) -> torch.Tensor:
    """n images from M fresh prior samples ranked (or resampled) by the learned reward: [n, C, H, W]."""
    z, scores = pool_scores(prior, reward, cfg.pool(n), cfg.steps, gen)
    with torch.no_grad():
        return prior.decode(z[choose(scores, n, how, cfg.beta, gen)])


@METHODS.register("best_of_m", config=BestOfMConfig, compare={"steps": "steps"})
def run(prior, user, budget: int, per_round: int, seed: int, *, config: BestOfMConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """Rate plain prior samples, fit the session's surrogate, keep the best n of M fresh samples by it."""
    return _run("top", prior, user, budget, per_round, seed, config, checkpoints, eval_samples)


@METHODS.register("best_of_m_is", config=BestOfMConfig, compare={"steps": "steps"})
def run_resampled(prior, user, budget: int, per_round: int, seed: int, *, config: BestOfMConfig | None = None,
                  checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """As ``best_of_m``, the n drawn from the M by importance resampling ∝ exp(β·r)."""
    return _run("resample", prior, user, budget, per_round, seed, config, checkpoints, eval_samples)

