"""DAS online (Kim et al., ICLR 2025): tempered SMC with reward-gradient proposals, refit reward plus UCB bonus.

DAS samples p(z_0)·exp(r(z_0)/α) with P independent populations of N particles. At step i the
particles z_i get their Tweedie estimate ẑ0, the reward r_i = r(ẑ0) and its gradient g_i = ∇_z r_i/α
(through the denoiser); the twist is λ_i·r_i/α with the exponential tempering schedule

    λ_i = min(1, (1 + γ)^i − 1),  i = 0 at the noise end (SEIKO/config/UCB_smc.py: "exp", start 0)

and the weights gain log p(z_i | z_{i−1}) − log q(z_i | z_{i−1}) + λ_i·r_i/α − λ_{i−1}·r_{i−1}/α.
A population is resampled when its ESS falls below ``ess_threshold``·N; then every particle moves by
the prior's ancestral kernel shifted by v_i·λ_{i+1}·g_i, v_i the kernel's variance (the code's
``prev_sample + variance·approx_guidance``, the guidance scaled by the next step's λ). After the
last move the weights gain λ_S·r(z_0)/α and each population returns its highest-weight particle
(the code's ``image[argmax(log_w)]``). λ_S = 1, so the target is p·exp(r/α) whatever γ.

The reward (``SEIKO/aesthetic_scorer.py`` ``online_ScorerDiff``, UCB): the learned network of
``baselines.online`` (an MLP on the prior's frozen features, the analogue of their MLP on CLIP
embeddings, fitted by MSE) plus the bonus min(c·sqrt(φᵀ Σ_code⁻¹ φ), clip), φ its last hidden layer,
Σ_code = Cov(φ over the rated images) + λ_osm·I. With n rated images, Cov ≈ Φᵀ Φ / n, so Σ_code⁻¹ =
n·Σ⁻¹ with Σ = ΦᵀΦ + n·λ_osm·I, the covariance of ``online.rated_covariance``; the bonus is
c·sqrt(n)·sqrt(φᵀ Σ⁻¹ φ) (their ``torch.cov`` also centres φ, ours does not).

The online loop is fk_steering's (:func:`apa.baselines.fk_steering.run_online`): round 0 rates plain
prior samples, the network and the UCB covariance are refit after every round on all ratings so
far, each round's ``per_round`` images come from ``per_round`` populations (their 16 fresh labels
per outer loop become our ``per_round``). The evaluation batches and the final sampler use the
network without the bonus (the code's ``only_eval`` path), fitted on all ratings so far.

Settings (``DASOnlineConfig``) and departures from the code (SD 1.5, 100 DDIM steps, η = 1):
- γ = 0.008 at 100 steps becomes (1.008)⁴ − 1 ≈ 0.0325 at 25, so λ is the same function of the
  fraction of the trajectory (λ reaches 1 at step 21.7 of 25, as at 87 of 100);
- α = 0.1. The code sets α per reward, over three orders of magnitude (config/sd.py: PickScore
  0.0001, aesthetic 0.005, CLIP 0.01; UCB_smc.py: aesthetic 0.005, jpeg 0.1), so no value carries
  over by itself. 0.1 is the code's value for its jpeg reward and gives the tilt exp(10·r) of FK
  steering's λ = 10. The aesthetic 0.005 over-optimises our learned reward: on MNIST (budget 80,
  8 per round) its gradient shift v·λ·∇r/α drives the final batch to textured noise that the
  network rates highly (0.21 preferred and confident, against 0.87 with α = 0.1);
- SSP resampling is not in ``apa.smc.resampling``; systematic takes its place (both give every
  particle ⌊N·w⌋ or ⌈N·w⌉ copies);
- after resampling, the ancestors' twists and guidance are taken along with their particles (the
  code reindexes the latents but not ``log_twist_func``, which biases its next weights, nor
  ``approx_guidance``, which only makes the proposal worse);
- the reward is read on the image of ẑ0 clipped to [0, 1] (as the code's decode does), and the
  guidance shift uses the VE kernel's variance (the code's DDIM variance in VP units).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from apa.baselines.common import MethodRun
from apa.baselines.online import (Draw, last_hidden, pick_per_population, population_ess, population_images,
                                  rated_covariance, resample_populations, run_online)
from apa.knobs import at_least, choice, fraction, knob, non_negative, positive
from apa.registry import METHODS, RESAMPLERS
from apa.smc import resampling
from apa.smc.fkc import proposal_log_ratio
from apa.surrogate.model import Ensemble
from apa.types import Particles

JACOBIANS = ("exact", "gaussian")
Reward = Callable[[Particles], torch.Tensor]  # particles [M, *event] -> rewards [M], differentiable


@dataclass(frozen=True)
class DASOnlineConfig:
    """DAS online's settings: ``SEIKO/config/UCB_smc.py`` (aesthetic) unless the module docstring says otherwise."""

    steps: int = knob(25, "ancestral steps (code: 100 DDIM steps)")
    particles: int = knob(4, "particles per population, one image each (code: smc.num_particles = 4)")
    alpha: float = knob(0.1, "KL coefficient α, target p·exp(r/α) (code: kl_weight 0.1 jpeg, 0.005 aesthetic)")
    gamma: float = knob(1.008**4 - 1, "exponential tempering rate (code: 0.008 at 100 steps)")
    ess_threshold: float = knob(0.5, "resample when ESS < threshold·N (code: 0.5)")
    resample: str = knob("systematic", "resampling scheme (code: ssp)", choices=RESAMPLERS)
    ucb_c: float = knob(1e-2, "UCB bonus weight (code: osm_alpha)")
    ucb_lambda: float = knob(1e-3, "ridge added to the feature covariance (code: osm_lambda)")
    ucb_clip: float = knob(10.0, "the bonus is clipped at this value (code: osm_clipping)")
    jacobian: str = knob("exact", "∂ẑ0/∂z: through the denoiser (code) or the Gaussian-data s²/(s²+σ²) (cheaper)",
                         choices=JACOBIANS)
    populations_per_call: int = knob(32, "populations run together (memory and speed; the random draws follow "
                                     "the chunks)")

    def __post_init__(self) -> None:
        for name in ("steps", "particles", "populations_per_call"):
            at_least(name, getattr(self, name), 1)
        positive("alpha", self.alpha)
        positive("gamma", self.gamma)
        fraction("ess_threshold", self.ess_threshold)
        non_negative("ucb_c", self.ucb_c)
        positive("ucb_lambda", self.ucb_lambda)
        positive("ucb_clip", self.ucb_clip)
        choice("jacobian", self.jacobian, JACOBIANS)
        resampling.get_resampler(self.resample)


def tempering(i: int, gamma: float) -> float:
    """λ_i = min(1, (1 + γ)^i − 1) for step i = 0, 1, ... from the noise end."""
    return min(1.0, (1.0 + gamma) ** i - 1.0)


# ---------------------------------------------------------------- the UCB reward


def ucb_reward(prior, model: Ensemble, rated: torch.Tensor, cfg: DASOnlineConfig) -> Reward:
    """r(z) + min(c·sqrt(n)·sqrt(φᵀΣ⁻¹φ), clip) on particles [M, *event] -> [M] (module docstring).

    ``model`` is the one-member MSE network of ``online.refit``; ``rated`` [n, *event] its inputs.
    φ and r share one feature pass: r is the network's last layer on φ.
    """
    if len(model.members) != 1 or model.loss != "mse":
        raise ValueError("the UCB reward reads one MSE member's last hidden layer; refit with members=1, loss='mse'")
    n = rated.shape[0]
    cov = rated_covariance(model, rated, lam=n * cfg.ucb_lambda)
    scale = cfg.ucb_c * math.sqrt(n)
    last = model.members[0].mlp[-1]

    def reward(z: Particles) -> torch.Tensor:
        phi = last_hidden(model, prior.decode(z) * 2.0 - 1.0)
        return last(phi).squeeze(1) + (scale * cov.bonus(phi)).clamp(max=cfg.ucb_clip)

    return reward


def plain_reward(prior, model: Ensemble) -> Reward:
    """The network alone on particles [M, *event] -> [M]: what evaluation samples use (the code's
    ``only_eval`` returns the raw reward, without the bonus)."""
    return lambda z: model(prior.decode(z) * 2.0 - 1.0)


# ---------------------------------------------------------------- one DAS run


@dataclass(frozen=True)
class DASState:
    """P populations of N particles at step ``step``. particles [P·N, *event]; the rest [P, N] float64."""

    particles: Particles
    log_weights: torch.Tensor  # carried forward between resamplings
    twist: torch.Tensor  # λ_{i−1}·r_{i−1}/α of each particle's parent (0 before the first step)
    log_ratio: torch.Tensor  # log p − log q of the move that produced each particle
    step: int


@dataclass(frozen=True)
class DASResult:
    particles: Particles  # clean particles z_0 [P·N, *event]
    log_weights: torch.Tensor  # [P, N] normalised per population
    ess: list[float]  # minimum ESS over populations at each step, before the resampling check
    ess_after: list[float]  # minimum ESS after the check (N where resampled)
    resampled: int  # populations resampled, summed over steps


def guided_eval(prior, reward: Reward, z: Particles, sigma: float, cfg: DASOnlineConfig
                ) -> tuple[Particles, torch.Tensor, Particles]:
    """ε, r(ẑ0) and ∇_z r(ẑ0)/α at z [M, *event]: ([M, *event], [M], [M, *event]), all detached.

    "exact" differentiates through the denoiser; "gaussian" takes ∂ẑ0/∂z = s²/(s²+σ²)·I.
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        if cfg.jacobian == "exact":
            eps = prior.eps(zz, sigma)
            r = reward(prior.tweedie(zz, sigma, eps))
            grad = torch.autograd.grad(r.sum(), zz)[0]
        else:
            with torch.no_grad():
                eps = prior.eps(zz, sigma)
            x0 = prior.tweedie(zz, sigma, eps).detach().requires_grad_(True)
            r = reward(x0)
            s2 = prior.data_std**2
            grad = torch.autograd.grad(r.sum(), x0)[0] * (s2 / (s2 + sigma**2))
    return eps.detach(), r.detach(), torch.nan_to_num(grad) / cfg.alpha


def das_step(state: DASState, prior, reward: Reward, cfg: DASOnlineConfig, sigmas: torch.Tensor,
             gen: torch.Generator | None) -> tuple[DASState, dict]:
    """Step i: weigh z_i by its twist, resample where ESS is low, move by the guided kernel.

    Returns the state at step i + 1 and {"ess", "ess_after": min over populations, "resampled": count}.
    """
    i, z = state.step, state.particles
    s, s_next = float(sigmas[i]), float(sigmas[i + 1])
    p, n = state.log_weights.shape
    eps, r, grad = guided_eval(prior, reward, z, s, cfg)
    twist = tempering(i, cfg.gamma) * r.double().view(p, n) / cfg.alpha
    log_w = state.log_weights + state.log_ratio + twist - state.twist
    ess = population_ess(log_w)
    chosen = ess < cfg.ess_threshold * n
    idx, log_w = resample_populations(log_w, chosen, cfg.resample, gen)
    z, eps, grad, twist = z[idx], eps[idx], grad[idx], twist.reshape(-1)[idx].view(p, n)
    v = prior.transition_variance(s, s_next)
    noise = torch.randn(z.shape, generator=gen)
    shift = v * tempering(i + 1, cfg.gamma) * grad if v > 0.0 else None
    z_next = prior.transition(z, eps, s, s_next, noise, shift=shift)
    log_ratio = (proposal_log_ratio(noise, shift, v).view(p, n) if shift is not None
                 else torch.zeros(p, n, dtype=torch.float64))
    info = {"ess": float(ess.min()), "ess_after": float(population_ess(log_w).min()), "resampled": int(chosen.sum())}
    return DASState(z_next.detach(), log_w, twist, log_ratio, i + 1), info


def das_sample(prior, reward: Reward, populations: int, cfg: DASOnlineConfig,
               gen: torch.Generator | None) -> DASResult:
    """One DAS run of P populations × N particles; the final weights include λ_S·r(z_0)/α."""
    sigmas = prior.sigmas(cfg.steps)
    z = prior.sample_initial(populations * cfg.particles, float(sigmas[0]), gen)
    zeros = torch.zeros(populations, cfg.particles, dtype=torch.float64)
    state = DASState(z, zeros - math.log(cfg.particles), zeros, zeros.clone(), 0)
    ess, after, resampled = [], [], 0
    while state.step < cfg.steps:
        state, info = das_step(state, prior, reward, cfg, sigmas, gen)
        ess.append(info["ess"])
        after.append(info["ess_after"])
        resampled += info["resampled"]
    with torch.no_grad():
        r = reward(state.particles).double().view(populations, cfg.particles)
    lw = state.log_weights + state.log_ratio + tempering(cfg.steps, cfg.gamma) * r / cfg.alpha - state.twist
    lw = lw - torch.logsumexp(lw, dim=1, keepdim=True)
    return DASResult(state.particles, lw, ess, after, resampled)


def das_images(prior, reward: Reward, n: int, cfg: DASOnlineConfig, gen: torch.Generator,
               log: list | None = None) -> torch.Tensor:
    """n images [n, C, H, W] in [0, 1]: each population's highest-weight particle, in chunks."""
    def chosen(k: int) -> tuple[torch.Tensor, DASResult]:
        res = das_sample(prior, reward, k, cfg, gen)
        return res.particles[pick_per_population(res.log_weights, res.log_weights, "best", None)], res

    return population_images(prior, n, cfg.populations_per_call, chosen, log)


@METHODS.register("das_online", config=DASOnlineConfig, compare={"steps": "steps"})
def run(prior, user, budget: int, per_round: int, seed: int, *, config: DASOnlineConfig | None = None,
        checkpoints: Sequence[int] = (), eval_samples: int = 64, workdir: Path | None = None) -> MethodRun:
    """DAS online: ``budget`` ratings in rounds of ``per_round``, each round's images from DAS steered
    by the refit network plus its UCB bonus. ``workdir`` is unused (the common signature)."""
    cfg = config or DASOnlineConfig()

    def steer(model: Ensemble, x: torch.Tensor) -> tuple[Draw, Draw]:
        explore, exploit = ucb_reward(prior, model, x, cfg), plain_reward(prior, model)
        return (lambda n, gen, log=None: das_images(prior, explore, n, cfg, gen, log),
                lambda n, gen, log=None: das_images(prior, exploit, n, cfg, gen, log))

    return run_online("das_online", prior, user, budget, per_round, seed, steer, cfg.steps,
                      checkpoints=checkpoints, eval_samples=eval_samples, info={"config": asdict(cfg)})
