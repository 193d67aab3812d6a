"""PAPA and EPAPA: online fine-tuning of a copy of the prior's ε-network from +1/-1 feedback.

Each round samples ``per_round`` images from the current model, the user rates them (+1 liked,
-1 not), and the copy takes one Adam step per mini-batch of the round's images (the public
code's batch is 1) on

    loss = mean_b [ label_b · pref_coef · Σ_t s_t · ‖ε_θ(x_t, t) − ε_b‖²/D
                    + [label_b > 0] · sim_coef · ‖ε_θ(x_T', T') − ε_base(x_T', T')‖²/D ]

with x_t = √ᾱ_t·x0_b + √(1 − ᾱ_t)·ε_b (one noise draw per image, shared by all t) and PAPA's
per-timestep scaling s_t = (1 − α_t) / (α_t · (1 − ᾱ_{t−1})), α_t = 1 − β_t. The sum runs over
all timesteps (PAPA) or over t ≥ k (EPAPA, k = 400), and EPAPA samples with the frozen base
network below k. The model-similarity term is taken on preferred images only, at the loop's last
timestep T' = T − 1, as the public code does (``similarity_at="all"`` averages it over the drawn
timesteps instead). At t = 0 the scaling needs ᾱ_{−1}; the public code's index −1 reads ᾱ_{T−1},
so s_0 ≈ β_0/α_0, and so does this module.

Departures that keep it feasible on a CPU (all documented in :class:`PAPAConfig`):
- the sum over the 1000 (or 600) timesteps is estimated from ``timesteps_per_image`` stratified
  draws, one per equal-width stratum, each weighted by its stratum's width: an unbiased estimate
  of the full sum (with ``timesteps_per_image`` ≥ the range, every timestep is used once, exactly);
- images are sampled with the ancestral sampler over ``sample_steps`` respaced steps, not all 1000.

Its round loop is not the session driver's (``apa.session.lifecycle.drive``): each round changes the
prior's weights, where a session's steps hold the prior frozen and keep only ratings and a surrogate.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from apa.baselines.common import (Clock, CountingUser, MethodRun, RoundRecord, check_checkpoints, plain_samples, round_sizes, to_targets)
from apa.knobs import at_least, between, choice, knob, non_negative, positive
from apa.priors.base import VEPrior
from apa.priors.ddpm import NUM_TRAIN_TIMESTEPS, alphas_cumprod
from apa.registry import METHODS
from apa.seeding import generator
from apa.types import Particles

SIMILARITY_AT = ("last", "all")


@dataclass(frozen=True)
class PAPAConfig:
    """PAPA's settings; defaults are the public code's (``config/default_papa.yaml``) unless marked CPU."""

    lr: float = knob(1e-5, "Adam learning rate")
    pref_coef: float = knob(0.1, "weight of the preference loss")
    sim_coef: float = knob(0.009, "weight of the model-similarity loss")
    k: int = knob(0, "EPAPA: timesteps below k keep the frozen base model (EPAPA: 400)")
    batch_size: int = knob(1, "images per optimiser step")
    similarity_at: str = knob("last", "where the model-similarity loss is taken: at T−1 (public code) or the mean "
                              "over the drawn timesteps", choices=SIMILARITY_AT)
    timesteps_per_image: int = knob(50, "CPU: stratified draws estimating the sum over all timesteps (public: all)")
    sample_steps: int = knob(25, "CPU: respaced ancestral steps per sample (public: 1000)")

    def __post_init__(self) -> None:
        positive("lr", self.lr)
        non_negative("pref_coef", self.pref_coef)
        non_negative("sim_coef", self.sim_coef)
        between("k", self.k, 0, NUM_TRAIN_TIMESTEPS - 1)
        choice("similarity_at", self.similarity_at, SIMILARITY_AT)
        for name in ("timesteps_per_image", "batch_size", "sample_steps"):
            at_least(name, getattr(self, name), 1)


EPAPA = PAPAConfig(k=400)
# the `apa compare` settings PAPA and EPAPA take (``registry.Method``): field -> comparison setting
COMPARE = {"lr": "papa_lr", "timesteps_per_image": "papa_timesteps", "sample_steps": "steps"}


# ---------------------------------------------------------------- the losses


def papa_scaling(t: torch.Tensor) -> torch.Tensor:
    """PAPA's per-timestep factor (1 − α_t)/(α_t·(1 − ᾱ_{t−1})) for integer timesteps t [S] -> [S] float32.

    ᾱ_{−1} is read as ᾱ_{T−1} (the public code's wrap-around index), so s_0 ≈ β_0/α_0.
    """
    acp = alphas_cumprod()
    alphas = torch.cat([acp[:1], acp[1:] / acp[:-1]])  # α_t = ᾱ_t/ᾱ_{t−1}, α_0 = ᾱ_0
    prev = acp[(t.long() - 1) % len(acp)]
    return ((1 - alphas[t.long()]) / (alphas[t.long()] * (1 - prev))).float()


def draw_timesteps(lo: int, hi: int, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Timesteps estimating a sum over lo..hi−1: (t [S] int64, weight [S] float32).

    With count ≥ hi − lo: every timestep, weight 1. Otherwise one uniform draw from each of
    ``count`` equal-width strata, weighted by the stratum's width (an unbiased estimate of the sum).
    """
    n = hi - lo
    if count >= n:
        return torch.arange(lo, hi), torch.ones(n)
    edges = torch.linspace(lo, hi, count + 1, dtype=torch.float64)
    t = (edges[:-1] + torch.rand(count, generator=gen, dtype=torch.float64) * (edges[1:] - edges[:-1])).floor()
    return t.long().clamp(lo, hi - 1), (edges[1:] - edges[:-1]).float()


def noised(x0: Particles, noise: Particles, t: torch.Tensor) -> Particles:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε for every (image, timestep): x0, noise [B, ...], t [S] -> [B·S, ...]."""
    a = alphas_cumprod().float()[t].view(1, -1, *([1] * (x0.dim() - 1)))
    x = a.sqrt() * x0.unsqueeze(1) + (1 - a).sqrt() * noise.unsqueeze(1)
    return x.reshape(-1, *x0.shape[1:])


def _pixel_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per row: [M, ...] -> [M]."""
    return (a - b).pow(2).reshape(a.shape[0], -1).mean(1)


def preference_loss(model: nn.Module, x0: Particles, noise: Particles, t: torch.Tensor,
                    weight: torch.Tensor) -> torch.Tensor:
    """Σ_t weight_t·s_t·‖ε_θ(x_t, t) − ε‖²/D per image: x0, noise [B, C, H, W], t, weight [S] -> [B]."""
    b, s = x0.shape[0], t.shape[0]
    tt = t.repeat(b).float()
    err = _pixel_mse(model(noised(x0, noise, t), tt), noise.repeat_interleave(s, 0)).view(b, s)
    return (err * (weight * papa_scaling(t)).view(1, s)).sum(1)


def similarity_loss(model: nn.Module, base: nn.Module, x0: Particles, noise: Particles,
                    t: torch.Tensor) -> torch.Tensor:
    """Mean over t [S] of ‖ε_θ(x_t, t) − ε_base(x_t, t)‖²/D per image: [B, C, H, W] -> [B]."""
    b, s = x0.shape[0], t.shape[0]
    x, tt = noised(x0, noise, t), t.repeat(b).float()
    with torch.no_grad():
        target = base(x, tt)
    return _pixel_mse(model(x, tt), target).view(b, s).mean(1)


def papa_loss(model: nn.Module, base: nn.Module, x0: Particles, labels: torch.Tensor, cfg: PAPAConfig,
              gen: torch.Generator) -> torch.Tensor:
    """PAPA's (or EPAPA's) objective on a batch: x0 [B, C, H, W] in [-1, 1], labels [B] in [-1, 1] -> scalar."""
    noise = torch.randn(x0.shape, generator=gen)
    t, w = draw_timesteps(cfg.k, NUM_TRAIN_TIMESTEPS, cfg.timesteps_per_image, gen)
    pref = preference_loss(model, x0, noise, t, w)
    liked = labels > 0
    sim = torch.zeros_like(pref)
    if cfg.sim_coef > 0 and bool(liked.any()):
        t_sim = torch.tensor([NUM_TRAIN_TIMESTEPS - 1]) if cfg.similarity_at == "last" else t
        sim = torch.where(liked, similarity_loss(model, base, x0, noise, t_sim), sim)
    return (labels * pref * cfg.pref_coef + sim * cfg.sim_coef).mean()


# ---------------------------------------------------------------- sampling with the tuned network


class SwitchedPrior(VEPrior):
    """The base prior's schedule with the tuned ε-network at timesteps ≥ k and the base one below."""

    def __init__(self, base: VEPrior, tuned: nn.Module, k: int = 0):
        self.base, self.tuned, self.k = base, tuned, int(k)
        self.event_shape, self.data_std = base.event_shape, base.data_std
        self.name, self.class_names = base.name, base.class_names

    def sigmas(self, num_steps: int) -> torch.Tensor:
        return self.base.sigmas(num_steps)

    def sample_initial(self, n: int, sigma: float, generator: torch.Generator | None = None) -> Particles:
        return self.base.sample_initial(n, sigma, generator)

    def network_at(self, sigma: float) -> nn.Module:
        """The tuned network when σ's timestep is at least k, else the base network."""
        return self.tuned if round(self.base.timestep_of_sigma(sigma)) >= self.k else self.base.model

    def eps(self, z: Particles, sigma: float) -> Particles:
        """ε̂ in VE form (as ``DDPMPrior.eps``) from the network chosen by σ. [N, ...] -> [N, ...]."""
        t = torch.full((z.shape[0],), self.base.timestep_of_sigma(sigma), dtype=torch.float32)
        return self.network_at(sigma)(z / (1.0 + sigma**2) ** 0.5, t)

    def decode(self, z0: Particles) -> torch.Tensor:
        return self.base.decode(z0)


# ---------------------------------------------------------------- the online loop


def finetune(tuned: nn.Module, base: nn.Module, opt: torch.optim.Optimizer, images: torch.Tensor,
             labels: torch.Tensor, cfg: PAPAConfig, gen: torch.Generator) -> float:
    """One pass over a round's images [k, C, H, W] in [0, 1] in order; returns the mean loss."""
    x0 = images * 2.0 - 1.0
    losses = []
    with torch.enable_grad():
        for idx in torch.arange(x0.shape[0]).split(cfg.batch_size):
            loss = papa_loss(tuned, base, x0[idx], labels[idx], cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
    return sum(losses) / len(losses)


@METHODS.register("papa", config=PAPAConfig, compare=COMPARE)
def run_papa(prior, user, budget: int, per_round: int, seed: int, *, config: PAPAConfig | None = None,
             checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None,
             method: str = "papa") -> MethodRun:
    """PAPA online: ``budget`` ratings in rounds of ``per_round``, one fine-tuning pass per round.

    ``prior`` must be a DDPM prior (``DDPMPrior``: ``model``, ``timestep_of_sigma``). Returns the
    rounds (feedback spent, rated images, scores), evaluation batches at ``checkpoints`` and the
    fine-tuned sampler. ``workdir`` is unused (the signature is the common one).
    """
    cfg = config or PAPAConfig()
    checks = check_checkpoints(checkpoints, budget, per_round)
    tuned = copy.deepcopy(prior.model).requires_grad_(True)
    sampler = SwitchedPrior(prior, tuned, cfg.k)
    opt = torch.optim.Adam(tuned.parameters(), lr=cfg.lr)
    user = CountingUser(user)
    clock, records, batches, losses, spent = Clock(), [], {}, [], 0
    for r, k in enumerate(round_sizes(budget, per_round)):
        t0 = clock.seconds()
        images = plain_samples(sampler, k, cfg.sample_steps, generator(seed, r, "round"))
        scores = user(images).float()
        losses.append(finetune(tuned, prior.model, opt, images, to_targets(scores, user), cfg,
                               generator(seed, r, "finetune")))
        spent += k
        records.append(RoundRecord(r, spent, tuple(scores.tolist()), images, clock.seconds() - t0))
        if spent in checks:
            batches[spent] = clock.evaluate(spent, lambda: plain_samples(
                sampler, eval_samples, cfg.sample_steps, generator(seed, spent, "eval")))
    tuned.requires_grad_(False)
    return MethodRun(method, tuple(records), batches,
                     lambda n, gen: plain_samples(sampler, n, cfg.sample_steps, gen), clock.seconds(),
                     clock.eval_seconds, user.rated, eval_calls=clock.eval_calls,
                     info={"config": asdict(cfg), "losses": losses})


@METHODS.register("epapa", config=EPAPA, compare=COMPARE)
def run_epapa(prior, user, budget: int, per_round: int, seed: int, *, config: PAPAConfig | None = None,
              checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """EPAPA: PAPA with the base model kept for timesteps below k (default k = 400)."""
    cfg = config if config is not None else EPAPA
    if cfg.k == 0:
        cfg = replace(cfg, k=EPAPA.k)
    return run_papa(prior, user, budget, per_round, seed, config=cfg, checkpoints=checkpoints,
                    eval_samples=eval_samples, workdir=workdir, method="epapa")


run = run_papa
