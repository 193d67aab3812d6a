"""What the online peers (FK steering, DAS online, SEIKO-UCB) share: a learned reward refit from
the ratings each round, and the UCB bonus of DAS and SEIKO.

- :func:`feature_reward` builds the reward network every online method here learns: an MLP on the
  prior's own frozen denoiser features of the clean image (``FeatureSurrogate``, the same network
  ``apa align`` uses by default, and the analogue of DAS's and SEIKO's MLP on image embeddings).
  Its initialisation is keyed by (seed, round), as a session's.
- :func:`refit` fits it on every rating so far with the session's fitting settings.
- :func:`run_online` is the round loop of the peers that sample against that reward (FK steering,
  DAS online), and ``population_ess`` / ``resample_populations`` / ``pick_per_population`` their
  many small populations of particles.
- :class:`FeatureCovariance` is the UCB bonus of DAS online and SEIKO: with φ(x) the reward
  network's last hidden layer and Σ = λ·I + Σ_i φ(x_i)φ(x_i)ᵀ over the rated images,
  bonus(x) = sqrt(φ(x)ᵀ Σ⁻¹ φ(x)), which is large where the ratings so far say little.

Images are particles in the prior's space [N, *event]; ratings are on [-1, 1].

Its round loop is not the session driver's (``apa.session.lifecycle.drive``): a peer keeps no store and samples
with its own engine (FK steering's or DAS's populations), so a session's SAMPLE and FINAL steps do not fit it.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from apa.baselines.common import (Clock, CountingUser, MethodRun, RoundRecord, check_checkpoints, plain_samples,
                                  round_sizes, to_targets)
from apa.seeding import generator, seeded_global
from apa.smc import resampling
from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate

FEATURE_T = 200  # the training timestep the prior's features are read at (the session's default)


def feature_reward(prior, seed: int, r: int, loss: str = "mse", members: int = 1) -> Ensemble:
    """A fresh reward network on the prior's denoiser features, initialised from (seed, r)."""
    fn = lambda x: prior.features(x, FEATURE_T)  # noqa: E731
    dim = int(fn(torch.zeros(1, *prior.event_shape)).shape[1])
    with seeded_global(seed, r, "init"):
        return Ensemble([FeatureSurrogate(fn, dim) for _ in range(members)], loss).eval()


def refit(prior, x: torch.Tensor, y: torch.Tensor, seed: int, r: int, loss: str = "mse",
          config: FitConfig = FitConfig()) -> Ensemble:
    """A reward network fitted after round r on every rated particle x [n, *event] with ratings y [n]."""
    model = feature_reward(prior, seed, r, loss)
    fit(model, x, y, config, generator(seed, r, "fit"))
    return model.requires_grad_(False)


def last_hidden(model: Ensemble, x: torch.Tensor) -> torch.Tensor:
    """φ(x): the first member's last hidden layer (after its ReLU), [N, *event] -> [N, H]."""
    member = model.members[0]
    head = member.mlp[:-1]  # LayerNorm'd features -> Linear -> ReLU
    return head(member.norm(member.embed(x)))


class FeatureCovariance:
    """Σ = λ·I + Σ_i φ_iφ_iᵀ over rated images; ``bonus(φ)`` = sqrt(φᵀ Σ⁻¹ φ) [N]."""

    def __init__(self, dim: int, lam: float = 1.0):
        if lam <= 0:
            raise ValueError(f"the ridge λ must be positive, got {lam}")
        self.sigma = lam * torch.eye(dim, dtype=torch.float64)

    def update(self, feats: torch.Tensor) -> None:
        """Add the features [n, H] of newly rated images."""
        f = feats.detach().double()
        self.sigma = self.sigma + f.T @ f

    def bonus(self, feats: torch.Tensor) -> torch.Tensor:
        """sqrt(φᵀ Σ⁻¹ φ) for features [N, H] -> [N] (differentiable in feats)."""
        inv = torch.linalg.inv(self.sigma).to(feats.dtype)
        return torch.einsum("nh,hk,nk->n", feats, inv, feats).clamp_min(0.0).sqrt()


def rated_covariance(model: Ensemble, x: torch.Tensor, lam: float = 1.0) -> FeatureCovariance:
    """The UCB covariance of a fitted reward network over every rated particle x [n, *event]."""
    with torch.no_grad():
        feats = last_hidden(model, x)
    cov = FeatureCovariance(feats.shape[1], lam)
    cov.update(feats)
    return cov


# ---------------------------------------------------------------- populations of particles (FK steering, DAS)


def population_ess(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS 1/Σw² of each population's normalised weights: log-weights [P, N] -> [P] float64."""
    lw = log_weights.double() - torch.logsumexp(log_weights.double(), dim=1, keepdim=True)
    return torch.exp(-torch.logsumexp(2.0 * lw, dim=1))


def resample_populations(log_weights: torch.Tensor, chosen: torch.Tensor, scheme: str,
                         gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Resample the ``chosen`` populations [P] bool within themselves, by log-weights [P, N].

    Returns (ancestors [P·N] into the flattened particles, log-weights [P, N] float64): uniform −log N
    where resampled, the normalised weights carried forward elsewhere.
    """
    p, n = log_weights.shape
    lw = log_weights.double() - torch.logsumexp(log_weights.double(), dim=1, keepdim=True)
    ancestors = torch.arange(p * n).view(p, n)
    draw = resampling.get_resampler(scheme)
    for k in torch.nonzero(chosen).flatten().tolist():
        ancestors[k] = k * n + draw(gen, lw[k], n)
    lw = torch.where(chosen[:, None], torch.full_like(lw, -math.log(n)), lw)
    return ancestors.flatten(), lw


def pick_per_population(scores: torch.Tensor, log_weights: torch.Tensor, how: str,
                        gen: torch.Generator | None) -> torch.Tensor:
    """One particle per population: argmax of ``scores`` [P, N] ("best") or one drawn by the
    log-weights [P, N] ("weighted"). -> indices [P] into the flattened [P·N] particles."""
    p, n = scores.shape
    if how == "best":
        local = scores.argmax(dim=1)
    else:
        probs = torch.exp(log_weights.double() - torch.logsumexp(log_weights.double(), dim=1, keepdim=True))
        local = torch.multinomial(probs, 1, generator=gen).flatten()
    return torch.arange(p) * n + local


def population_images(prior, n: int, per_call: int, chosen: Callable[[int], tuple[torch.Tensor, object]],
                      log: list | None = None) -> torch.Tensor:
    """n images [n, C, H, W] in [0, 1], one per population, run ``per_call`` populations at a time.

    ``chosen(k)`` runs k populations and returns (the chosen particle of each [k, *event], the run's
    result, whose ``ess`` and ``resampled`` are appended to ``log`` when it is not None)."""
    out = []
    for start in range(0, n, per_call):
        particles, res = chosen(min(per_call, n - start))
        out.append(prior.decode(particles))
        if log is not None:
            log.append({"min_ess": min(res.ess), "resampled": res.resampled})
    return torch.cat(out) if out else torch.zeros(0, *prior.event_shape)


# ---------------------------------------------------------------- the online loop of the learned-reward peers


Draw = Callable[[int, torch.Generator, "list | None"], torch.Tensor]  # (n, generator, log) -> images [n, C, H, W]


def run_online(method: str, prior, user, budget: int, per_round: int, seed: int,
               steer: Callable[[torch.nn.Module, torch.Tensor], tuple[Draw, Draw]], steps: int, *,
               checkpoints: Sequence[int], eval_samples: int, info: dict) -> MethodRun:
    """The online loop of the learned-reward peers (module docstring).

    ``steer(model, x)`` turns the reward network fitted on the rated particles x [n, *event] into
    two samplers (n, generator, log) -> images [n, C, H, W] that append their per-call summaries to
    ``log`` (when not None): one draws the next round's images, the other the evaluation batches
    and the final images (the same one, or one without an exploration bonus). Round 0 draws plain
    prior samples over ``steps`` steps. ``info`` gains "round_sampling": per round, the summaries
    of the calls that drew its images.
    """
    checks = check_checkpoints(checkpoints, budget, per_round)
    user = CountingUser(user)
    clock, records, batches, spent, logs = Clock(), [], {}, 0, []
    xs, ys = [], []
    draw: Draw = lambda n, gen, log=None: plain_samples(prior, n, steps, gen)  # noqa: E731
    final = draw
    for r, k in enumerate(round_sizes(budget, per_round)):
        t0, log = clock.seconds(), []
        images = draw(k, generator(seed, r, "round"), log)
        scores = user(images).float()
        xs.append(images * 2.0 - 1.0)
        ys.append(to_targets(scores, user))
        x = torch.cat(xs)
        draw, final = steer(refit(prior, x, torch.cat(ys), seed, r), x)
        spent += k
        records.append(RoundRecord(r, spent, tuple(scores.tolist()), images, clock.seconds() - t0))
        logs.append(log)
        if spent in checks:
            batches[spent] = clock.evaluate(spent, lambda: final(eval_samples, generator(seed, spent, "eval"), None))
    return MethodRun(method, tuple(records), batches, lambda n, gen: final(n, gen, None), clock.seconds(),
                     clock.eval_seconds, user.rated, eval_calls=clock.eval_calls,
                     info={**info, "round_sampling": logs})
