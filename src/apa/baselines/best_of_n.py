"""Best-of-N: spend the budget rating plain prior samples, then sample around the best-rated ones.

Each round rates ``per_round`` fresh samples of the prior. The aligned sampler then draws its
images from the rated pool's best (every image with the highest score, or the ``top`` highest)
and refines each SDEdit-style: the chosen image x0 is re-noised to the training timestep
``refine_t`` (z = x0 + σ_t·ξ in the prior's VE form) and denoised by the prior's own ancestral
sampler over the respaced steps below that noise level. With the default ``refine_t = 300``
(σ ≈ 1.25, ᾱ ≈ 0.39) a digit keeps its class and most of its shape while strokes vary; a
higher ``refine_t`` trades faithfulness to the chosen image for diversity, ``refine_t = 0``
repeats the best images as they are.

Its round loop is not the session driver's (``apa.session.lifecycle.drive``): its rounds rate plain prior
samples and fit nothing, so a session's SAMPLE (guided by a surrogate) and FIT steps have nothing to do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from apa.baselines.common import (Clock, CountingUser, MethodRun, RoundRecord, check_checkpoints, plain_samples,
                                  round_sizes)
from apa.config import NUM_TIMESTEPS
from apa.knobs import at_least, between, knob, require, whole
from apa.registry import METHODS
from apa.seeding import generator
from apa.smc.sampler import renoised


@dataclass(frozen=True)
class BestOfNConfig:
    """Best-of-N's settings."""

    steps: int = knob(25, "ancestral steps of the prior's samples (and of the full grid the refinement follows)")
    refine_t: int = knob(300, "training timestep the chosen images are re-noised to (0: no refinement)")
    top: int | None = knob(None, "keep this many best-rated images (none: all that share the best score)")

    def __post_init__(self) -> None:
        at_least("steps", self.steps, 1)
        between("refine_t", self.refine_t, 0, NUM_TIMESTEPS - 1)
        require(self.top is None or (whole(self.top) and self.top >= 1),
                f"top must be a whole number of images from 1, or none; got {self.top!r}")


def best_indices(scores: torch.Tensor, top: int | None) -> torch.Tensor:
    """Indices of the best-rated images: all with the maximal score, or the ``top`` highest. [n] -> [m]."""
    if top is not None:
        return torch.argsort(-scores, stable=True)[:top]
    return torch.nonzero(scores == scores.max()).flatten()


@torch.no_grad()
def refine(prior, images: torch.Tensor, refine_t: int, steps: int, gen: torch.Generator) -> torch.Tensor:
    """SDEdit: re-noise images [n, C, H, W] in [0, 1] to timestep refine_t and denoise with the prior
    (``smc.sampler.renoised``: the respaced grid of ``steps`` steps below σ(refine_t)). -> [n, C, H, W]."""
    if refine_t == 0:
        return images.clone()
    return prior.decode(renoised(prior, images * 2.0 - 1.0, refine_t, steps, gen))


def sample_around(prior, pool: torch.Tensor, scores: torch.Tensor, n: int, cfg: BestOfNConfig,
                  gen: torch.Generator) -> torch.Tensor:
    """n images refined around the best of a rated pool [m, C, H, W] with scores [m]: [n, C, H, W]."""
    best = best_indices(scores, cfg.top)
    chosen = best[torch.randint(0, len(best), (n,), generator=gen)]
    return refine(prior, pool[chosen], cfg.refine_t, cfg.steps, gen)


@METHODS.register("best_of_n", config=BestOfNConfig, compare={"steps": "steps", "refine_t": "refine_t"})
def run(prior, user, budget: int, per_round: int, seed: int, *, config: BestOfNConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """Rate ``budget`` prior samples in rounds; the sampler refines around the best-rated so far."""
    cfg = config or BestOfNConfig()
    checks = check_checkpoints(checkpoints, budget, per_round)
    user = CountingUser(user)
    clock, records, batches, spent = Clock(), [], {}, 0
    pool, scores = [], []
    for r, k in enumerate(round_sizes(budget, per_round)):
        t0 = clock.seconds()
        images = plain_samples(prior, k, cfg.steps, generator(seed, r, "round"))
        rated = user(images).float()
        pool.append(images)
        scores.append(rated)
        spent += k
        records.append(RoundRecord(r, spent, tuple(rated.tolist()), images, clock.seconds() - t0))
        if spent in checks:
            x, y = torch.cat(pool), torch.cat(scores)
            batches[spent] = clock.evaluate(spent, lambda: sample_around(
                prior, x, y, eval_samples, cfg, generator(seed, spent, "eval")))
    x, y = torch.cat(pool), torch.cat(scores)
    best = best_indices(y, cfg.top)
    return MethodRun("best_of_n", tuple(records), batches, lambda n, gen: sample_around(prior, x, y, n, cfg, gen),
                     clock.seconds(), clock.eval_seconds, user.rated, eval_calls=clock.eval_calls,
                     info={"config": asdict(cfg), "best_score": float(y.max()), "best_count": int(len(best))})
