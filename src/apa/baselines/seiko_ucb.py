"""SEIKO-UCB: online fine-tuning of a copy of the prior's ε-network on a learned, optimistic reward
(Uehara et al., "Feedback efficient online fine-tuning of diffusion models", ICML 2024).

Each round samples ``per_round`` images from the current fine-tuned model, the user rates them, a
reward network is refit on every rating so far (``online.refit``, mse on the [-1, 1] scale), the UCB
bonus is built from the rated images' features (``online.rated_covariance``), and the copy takes
``inner_steps`` optimiser steps of direct backpropagation through the sampler (AlignProp / DRaFT
style) on

    loss = reward_coef · mean_b[ −r̃(x0_b) ] + kl_weight · mean_b[ Σ_i KL_i,b / D ]
    r̃(x) = r(x) + min(c · sqrt(φ(x)ᵀ Σ⁻¹ φ(x)), clip)                       (paper Alg. 1, UCB bonus)
    KL_i  = ‖μ_θ(z_i) − μ_ref(z_i)‖² / (2 v_i)                            (one ancestral step)

with μ the mean of the prior's ancestral transition z_i -> z_{i+1} under the tuned and the reference
network, v_i its per-coordinate variance and D the number of coordinates (the public code averages
the KL over the latent's coordinates; Σ_i KL_i is the KL between the two samplers' path measures).
The sum runs over the steps that are backpropagated (the others carry no gradient); the last step
of our grid is deterministic (σ' = 0: it lands on the Tweedie mean), has no KL and is left out.
The reference is the previous round's model (``kl_reference="previous"``, the public code's
``current_unet``: a mirror-descent step, so p⁽ⁱ⁾ ∝ p⁽ⁱ⁻¹⁾·exp(r̃⁽ⁱ⁾/α) at the optimum) or the frozen
prior (``kl_reference="pretrained"``: p ∝ p_pre·exp(r̃/α)).

What carries over from the public code (``config/UCB.py:aesthetic``, ``online/online_main.py``):
reward and KL weights (loss_coeff = kl_weight = 0.01), the UCB coefficient (osm_alpha = 0.01), the
bonus clip (10), the gradient-norm clip (5.0), a fresh optimiser per round, 10 optimiser steps per
round (5 epochs × 2 steps), η = 1 ancestral sampling, and truncated backpropagation from a random
step drawn uniformly over the whole grid (their (0, 50) of 50 steps is (0, 24) of 25 here: the
last step is always backpropagated, so every step has a gradient).

What changed, and why (the public code fine-tunes LoRA layers of SD 1.5 on 4 GPUs):
- ``lr`` 1e-4 with AdamW and no weight decay (public: 1e-3, decay 0.1). Here the whole 1M-parameter
  UNet is tuned, not LoRA adapters: decay on LoRA pulls toward the base model, on full weights it pulls
  toward zero and erases the prior; and 1e-3 on every weight of the full network wrecks the
  samples within a round (measured on MNIST: from the second round on, not one sample is a
  confident digit), while 1e-4 moves it steadily.
- ``batch_size`` 8 trajectories per optimiser step (public: 64) and ``steps`` 25 (public: 50 DDIM):
  so that a budget-80 run on the MNIST prior (10 rounds of 8) with a 256-image final batch costs at
  most about four minutes on one CPU thread (measured: 196 s with the other core busy, 250 s with
  both cores oversubscribed; a fine-tuning step of 8 trajectories costs 0.6–3.1 s by where it is truncated).
- ``ridge`` λ = 1e-3 is kept, but our covariance is the standard linear-UCB Σ = λI + Σ_i φ_iφ_iᵀ
  (``online.FeatureCovariance``, shared with DAS online) where the public code uses the sample
  covariance of the n rated features plus λI: their bonus at ridge λ is about √n times ours at ridge
  n·λ. With 128 hidden units and at most a few hundred ratings, the rated features do not span the
  feature space, and the bonus of an unrated image is dominated by its component outside their span
  over √λ (c·bonus ≈ 0.1–0.6 on fresh MNIST samples after 16 ratings, just under c = 0.01 at the
  rated ones, where sqrt(φᵀΣ⁻¹φ) is a ridge leverage below 1).
- the reward network is ``online.refit``'s MLP on the prior's own denoiser features (public: an MLP on
  CLIP embeddings) and its ratings are the user's on [-1, 1] (public: aesthetic score, |r − 10| loss,
  which for r < 10 is −r).

Images are [n, 1, 28, 28] in [0, 1]; particles (what the sampler and the reward see) are images·2 − 1.

Its round loop is not the session driver's (``apa.session.lifecycle.drive``): each round changes the
prior's weights, where a session's steps hold the prior frozen and keep only ratings and a surrogate.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from apa.baselines import online
from apa.baselines.common import (Clock, CountingUser, MethodRun, RoundRecord, check_checkpoints, plain_samples,
                                  round_sizes, to_targets)
from apa.baselines.papa import SwitchedPrior
from apa.knobs import at_least, choice, knob, non_negative, positive, require, whole
from apa.registry import METHODS
from apa.seeding import generator
from apa.types import Particles

KL_REFERENCES = ("previous", "pretrained")
Objective = Callable[[Particles], torch.Tensor]  # clean particles [B, *event] -> reward [B], differentiable


@dataclass(frozen=True)
class SEIKOConfig:
    """SEIKO-UCB's settings; defaults are the public code's (``config/UCB.py:aesthetic``) unless marked CPU."""

    steps: int = knob(25, "CPU: ancestral steps for sampling and fine-tuning (public: 50 DDIM, η = 1)")
    lr: float = knob(1e-4, "CPU: AdamW learning rate, on the whole ε-network (public: 1e-3 on LoRA layers)")
    weight_decay: float = knob(0.0, "CPU: AdamW weight decay, none on full weights (public: 0.1 on LoRA, a pull "
                                "toward the base)")
    max_grad_norm: float = knob(5.0, "gradient-norm clip")
    reward_coef: float = knob(0.01, "weight of −r̃ (public loss_coeff)")
    kl_weight: float = knob(0.01, "weight of the per-coordinate trajectory KL (public kl_weight)")
    ucb_coef: float = knob(0.01, "c: weight of the UCB bonus (public osm_alpha)")
    ridge: float = knob(1e-3, "λ of Σ = λI + Σ φφᵀ (public osm_lambda, on their sample covariance)")
    bonus_clip: float = knob(10.0, "the weighted bonus is clipped at this (public osm_clipping)")
    inner_steps: int = knob(10, "optimiser steps per round (public: 5 epochs × 2 steps)")
    batch_size: int = knob(8, "CPU: trajectories per optimiser step (public: 64)")
    truncate_min: int = knob(0, "backpropagate from a step drawn uniformly in [truncate_min, truncate_max]; earlier "
                             "steps carry no gradient")
    truncate_max: int = knob(24, "the highest step backpropagation starts from (public: (0, 50) of 50); capped at "
                             "steps − 1")
    kl_reference: str = knob("previous", "KL to the previous round's model (public) or to the pretrained prior",
                             choices=KL_REFERENCES)

    def __post_init__(self) -> None:
        choice("kl_reference", self.kl_reference, KL_REFERENCES)
        for name in ("steps", "inner_steps", "batch_size"):
            at_least(name, getattr(self, name), 1)
        require(whole(self.truncate_min) and whole(self.truncate_max) and 0 <= self.truncate_min <= self.truncate_max,
                f"need whole numbers 0 <= truncate_min <= truncate_max, got ({self.truncate_min}, {self.truncate_max})")
        for name in ("lr", "max_grad_norm", "ridge"):
            positive(name, getattr(self, name))
        for name in ("weight_decay", "reward_coef", "kl_weight", "ucb_coef", "bonus_clip"):
            non_negative(name, getattr(self, name))


# ---------------------------------------------------------------- the objective's terms


def step_kl(mean: Particles, ref_mean: Particles, variance: float) -> torch.Tensor:
    """KL(N(mean, v·I) ‖ N(ref_mean, v·I)) = ‖mean − ref_mean‖²/(2v) per row: [B, ...] -> [B]."""
    return (mean - ref_mean).pow(2).reshape(mean.shape[0], -1).sum(1) / (2.0 * variance)


def transition_mean(prior: SwitchedPrior, z: Particles, sigma: float, sigma_next: float,
                    eps: Particles | None = None) -> Particles:
    """The mean of the ancestral step σ -> σ' under ``prior``'s network (the step with zero noise): [B, ...]."""
    eps = prior.eps(z, sigma) if eps is None else eps
    return prior.transition(z, eps, sigma, sigma_next, torch.zeros_like(z))


def optimistic_reward(reward: nn.Module, cov: online.FeatureCovariance, coef: float, clip: float) -> Objective:
    """r̃(x) = r(x) + min(c·sqrt(φ(x)ᵀ Σ⁻¹ φ(x)), clip): particles [B, *event] -> [B], differentiable."""

    def objective(x: Particles) -> torch.Tensor:
        bonus = cov.bonus(online.last_hidden(reward, x)) * coef
        return reward(x) + bonus.clamp(max=clip)

    return objective


# ---------------------------------------------------------------- one fine-tuning step


def rollout(policy: SwitchedPrior, reference: SwitchedPrior, n: int, steps: int, start: int,
            gen: torch.Generator) -> tuple[Particles, torch.Tensor]:
    """Sample n clean particles with ``policy``, differentiable from step ``start`` on.

    Returns (x0 [n, *event], Σ_i KL_i [n] over the stochastic steps i ≥ start). Steps before ``start``
    run without a graph (truncated backpropagation); the reference network is evaluated only where
    the KL carries gradient, at the policy's own states z_i.
    """
    sig = policy.sigmas(steps)
    z = policy.sample_initial(n, float(sig[0]), gen)
    kl = torch.zeros(n)
    for i in range(steps):
        s, s_next = float(sig[i]), float(sig[i + 1])
        noise = torch.randn(z.shape, generator=gen)
        with torch.set_grad_enabled(i >= start):
            eps = policy.eps(z, s)
            v = policy.transition_variance(s, s_next)
            if i >= start and v > 0:
                mean, ref_mean = transition_mean(policy, z, s, s_next, eps), transition_mean(reference, z, s, s_next)
                kl = kl + step_kl(mean, ref_mean, v)
            z = policy.transition(z, eps, s, s_next, noise)
    return z, kl


def seiko_loss(policy: SwitchedPrior, reference: SwitchedPrior, objective: Objective, cfg: SEIKOConfig,
               gen: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """reward_coef·mean(−r̃(x0)) + kl_weight·mean(Σ_i KL_i / D) on ``batch_size`` fresh trajectories."""
    start = min(int(torch.randint(cfg.truncate_min, cfg.truncate_max + 1, (1,), generator=gen)), cfg.steps - 1)
    x0, kl = rollout(policy, reference, cfg.batch_size, cfg.steps, start, gen)
    r = objective(x0)
    dims = x0[0].numel()
    loss = cfg.reward_coef * (-r).mean() + cfg.kl_weight * (kl / dims).mean()
    return loss, {"loss": float(loss.detach()), "reward": float(r.detach().mean()),
                  "kl": float(kl.detach().mean()), "start": start}


def finetune(policy: SwitchedPrior, reference: SwitchedPrior, objective: Objective, cfg: SEIKOConfig,
             gen: torch.Generator) -> list[dict[str, float]]:
    """``inner_steps`` clipped optimiser steps of a fresh optimiser on ``policy.tuned``; per-step stats."""
    params = list(policy.tuned.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    stats = []
    with torch.enable_grad():
        for _ in range(cfg.inner_steps):
            loss, info = seiko_loss(policy, reference, objective, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            opt.step()
            stats.append(info)
    return stats


# ---------------------------------------------------------------- the online loop


def reference_for(prior, policy: SwitchedPrior, cfg: SEIKOConfig) -> SwitchedPrior:
    """The KL's reference: a frozen snapshot of the current tuned network, or the prior's own network."""
    if cfg.kl_reference == "pretrained":
        return SwitchedPrior(prior, prior.model)
    return SwitchedPrior(prior, copy.deepcopy(policy.tuned).requires_grad_(False))


def fit_objective(prior, x: Particles, y: torch.Tensor, seed: int, r: int, cfg: SEIKOConfig) -> Objective:
    """Refit the reward on every rated particle x [n, *event] (ratings y [n]) and add the UCB bonus."""
    reward = online.refit(prior, x, y, seed, r, "mse")
    cov = online.rated_covariance(reward, x, cfg.ridge)
    return optimistic_reward(reward, cov, cfg.ucb_coef, cfg.bonus_clip)


@METHODS.register("seiko_ucb", config=SEIKOConfig, compare={"steps": "steps"})
def run_seiko_ucb(prior, user, budget: int, per_round: int, seed: int, *, config: SEIKOConfig | None = None,
                  checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """SEIKO-UCB online: ``budget`` ratings in rounds of ``per_round``; refit r̃, then fine-tune, each round.

    ``prior`` must be a DDPM prior (``DDPMPrior``: ``model``, ``timestep_of_sigma``, ``features``).
    Returns the rounds, evaluation batches at ``checkpoints`` and the fine-tuned sampler.
    ``workdir`` is unused (the signature is the common one).
    """
    cfg = config or SEIKOConfig()
    checks = check_checkpoints(checkpoints, budget, per_round)
    policy = SwitchedPrior(prior, copy.deepcopy(prior.model).requires_grad_(True))
    user = CountingUser(user)
    clock, records, batches, stats, spent = Clock(), [], {}, [], 0
    xs, ys = torch.zeros(0, *prior.event_shape), torch.zeros(0)
    for r, k in enumerate(round_sizes(budget, per_round)):
        t0 = clock.seconds()
        images = plain_samples(policy, k, cfg.steps, generator(seed, r, "round"))
        scores = user(images).float()
        xs, ys = torch.cat([xs, images * 2.0 - 1.0]), torch.cat([ys, to_targets(scores, user)])
        objective = fit_objective(prior, xs, ys, seed, r, cfg)
        stats.append(finetune(policy, reference_for(prior, policy, cfg), objective, cfg,
                              generator(seed, r, "finetune")))
        spent += k
        records.append(RoundRecord(r, spent, tuple(scores.tolist()), images, clock.seconds() - t0))
        if spent in checks:
            batches[spent] = clock.evaluate(spent, lambda: plain_samples(
                policy, eval_samples, cfg.steps, generator(seed, spent, "eval")))
    policy.tuned.requires_grad_(False)
    return MethodRun("seiko_ucb", tuple(records), batches,
                     lambda n, gen: plain_samples(policy, n, cfg.steps, gen), clock.seconds(),
                     clock.eval_seconds, user.rated, eval_calls=clock.eval_calls,
                     info={"config": asdict(cfg), "finetune": stats})


run = run_seiko_ucb
