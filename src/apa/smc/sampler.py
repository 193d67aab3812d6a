"""② The FKC-SMC sampler: a pure ``step`` function, a ``run`` generator and ``fkc_sample``.

Per step i (σ_i -> σ_{i+1}) with particles z_i and normalised log-weights:
  1. potential at z_i: ε, ẑ0, r, L_div and ∇_z φ_i (``fkc.evaluate_potential``)
  2. log w += increment (``fkc.log_weight_increment``; at i = 0 also φ_0(z_0), the start)
  3. if ESS < threshold·N: resample (ancestors drawn by the chosen scheme), weights reset to 1/N;
     otherwise the weights are carried forward
  4. move: the prior's ancestral transition plus the FKC drift shift (g²ds/2)·∇φ_i
Steps 2-3 use only z_i, so resampling before the move reuses the network's output.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from apa.priors.base import Prior
from apa.smc import fkc, resampling
from apa.smc.weights import ess as ess_of
from apa.smc.weights import normalize, uniform
from apa.types import Indices, LogWeights, Particles

NoiseFn = Callable[[int, tuple[int, ...], torch.Generator | None], torch.Tensor]


@dataclass(frozen=True)
class FKCConfig:
    """How to sample. Defaults are the seed's unless marked."""

    num_steps: int = 25
    beta: tuple[float, float] = (0.5, 2.0)  # β linear from start to end over the steps
    gamma: tuple[float, float] = (0.05, 0.0)  # γ linear (diversity weight)
    beta_dot: float | None = None  # None: ∂_sβ from the β schedule; a number: the seed's constant override
    diversity: bool = False  # the L_div term (off for images in the seed)
    reward_at: str = "xt"  # "xt": r(z_t), exact; "tweedie": r(ẑ0), the seed's choice
    jacobian: str = "exact"  # with reward_at="tweedie": "exact" | "gaussian" | "identity" (seed literal)
    resample: str = "systematic"  # systematic | stratified | residual | multinomial | none
    ess_threshold: float = 0.5  # resample when ESS < threshold·N
    use_weights: bool = True  # False: gradient guidance alone (no weights, no resampling)
    clamp: float | None = None  # the seed's clamp of accumulated log-weights to [−c, c] (seed: 100)

    def __post_init__(self) -> None:
        if self.reward_at not in fkc.REWARD_AT:
            raise ValueError(f"reward_at must be one of {fkc.REWARD_AT}, got {self.reward_at!r}")
        if self.jacobian not in fkc.JACOBIANS:
            raise ValueError(f"jacobian must be one of {fkc.JACOBIANS}, got {self.jacobian!r}")
        if self.resample != "none":
            resampling.get_resampler(self.resample)
        if not 0.0 <= self.ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {self.ess_threshold}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}")
        if self.reward_at == "tweedie" and self.jacobian == "identity":
            warnings.warn("jacobian='identity' applies ∇r(ẑ0) as if it were ∇_z r: the seed's literal reading, "
                          "which blows up the drift at high noise for DDPM priors; use 'exact' or 'gaussian'",
                          stacklevel=3)

    @property
    def guided(self) -> bool:
        return self.beta[0] != 0.0 or self.beta[1] != 0.0


@dataclass(frozen=True)
class SMCState:
    particles: Particles  # z_i [N, *event]
    log_weights: LogWeights  # [N] float64; normalised unless the seed's clamp is on
    step: int  # i: the next step to take
    log_normalizer: float = 0.0  # running estimate of log Z_i
    origins: Indices | None = None  # [N] index of each particle's initial ancestor


@dataclass(frozen=True)
class StepInfo:
    step: int
    sigma: float
    ess: float  # before any resampling at this step
    resampled: bool
    reward_mean: float  # weighted mean of r at this step (before the move)
    grad_norm: float  # mean ‖β·∇φ‖ over particles
    unique_origins: int  # distinct initial ancestors alive after this step


@dataclass(frozen=True)
class SMCResult:
    particles: Particles  # final z_0 [N, *event]
    log_weights: LogWeights  # [N] normalised
    trace: list[StepInfo] = field(default_factory=list)
    log_normalizer: float = 0.0
    origins: Indices | None = None

    @property
    def weights(self) -> torch.Tensor:
        return torch.exp(self.log_weights)

    @property
    def ess(self) -> float:
        return ess_of(self.log_weights)

    def resample(self, num_samples: int | None = None, generator: torch.Generator | None = None,
                 scheme: str = "systematic") -> Particles:
        """Equal-weight particles drawn from the weighted population: [M, *event]."""
        n = num_samples or self.particles.shape[0]
        return self.particles[resampling.get_resampler(scheme)(generator, self.log_weights, n)]


def _default_noise(step: int, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(shape, generator=generator)


def _increment(cfg: FKCConfig, pe: fkc.PotentialEval, prior: Prior, z: Particles, i: int, sig: float,
               sig_next: float, betas: torch.Tensor, gammas: torch.Tensor, grad_phi: Particles) -> torch.Tensor:
    """The log-weight increment of step i [N] (plus the start φ_0(z_0) when i = 0)."""
    b0, b1, g0, g1 = float(betas[i]), float(betas[i + 1]), float(gammas[i]), float(gammas[i + 1])
    if cfg.beta_dot is None:
        dphi = (b1 - b0) * pe.reward + (b1 * g1 - b0 * g0) * pe.div  # φ_{i+1} − φ_i at fixed z
    else:
        dphi = cfg.beta_dot / cfg.num_steps * (pe.reward + g0 * pe.div)  # seed: β_dot·(r + γ·L_div)·ds
    score = prior.score(z, sig, pe.eps)
    inc = fkc.log_weight_increment(dphi, grad_phi, score, prior.forward_drift(z, sig, sig_next),
                                   prior.g2_ds(sig, sig_next))
    if i == 0:
        inc = inc + b0 * (pe.reward + g0 * pe.div).double()  # start: log w(z_T) = φ_start(z_T)
    return inc


def step(state: SMCState, prior: Prior, reward: fkc.Reward, cfg: FKCConfig, sigmas: torch.Tensor, *,
         generator: torch.Generator | None = None, historical: Particles | None = None,
         noise_fn: NoiseFn = _default_noise) -> tuple[SMCState, StepInfo]:
    """One FKC-SMC step σ_i -> σ_{i+1}. Pure: returns a new state and the step's info."""
    i, z = state.step, state.particles
    sig, sig_next = float(sigmas[i]), float(sigmas[i + 1])
    betas = fkc.linear_schedule(*cfg.beta, cfg.num_steps)
    gammas = fkc.linear_schedule(*cfg.gamma, cfg.num_steps)
    log_w, log_z, origins = state.log_weights, state.log_normalizer, state.origins
    if cfg.guided:
        pe = fkc.evaluate_potential(prior, reward, z, sig, float(gammas[i]), reward_at=cfg.reward_at,
                                    jacobian=cfg.jacobian, use_diversity=cfg.diversity, historical=historical, step=i)
        eps, grad_phi = pe.eps, float(betas[i]) * pe.grad
        reward_mean = float((torch.exp(normalize(log_w)) * pe.reward.double()).sum())
    else:
        with torch.no_grad():
            eps = prior.eps(z, sig)
        grad_phi, reward_mean = torch.zeros_like(z), float("nan")
    if cfg.guided and cfg.use_weights:
        inc = _increment(cfg, pe, prior, z, i, sig, sig_next, betas, gammas, grad_phi)
        fkc._check_finite(inc, "the log-weight increment", i)
        log_z += float(torch.logsumexp(normalize(log_w) + inc, 0)) if cfg.clamp is None else 0.0
        log_w = (log_w + inc).clamp(-cfg.clamp, cfg.clamp) if cfg.clamp is not None else normalize(log_w + inc)
    ess = ess_of(log_w)
    resampled = cfg.use_weights and cfg.resample != "none" and resampling.ess_threshold(log_w, cfg.ess_threshold)
    if resampled:
        idx = resampling.get_resampler(cfg.resample)(generator, log_w, z.shape[0])
        z, eps, grad_phi = z[idx], eps[idx], grad_phi[idx]
        origins = origins[idx] if origins is not None else None
        log_w = uniform(z.shape[0])
    shift = fkc.drift_shift(grad_phi, prior.g2_ds(sig, sig_next)) if cfg.guided else None
    with torch.no_grad():
        z_next = prior.transition(z, eps, sig, sig_next, noise_fn(i, tuple(z.shape), generator).to(z), shift=shift)
    grad_norm = float(grad_phi.reshape(z.shape[0], -1).norm(dim=1).mean())
    info = StepInfo(i, sig, ess, resampled, reward_mean, grad_norm,
                    int(origins.unique().numel()) if origins is not None else -1)
    return SMCState(z_next.detach(), log_w, i + 1, log_z, origins), info


def init_state(prior: Prior, num_particles: int, sigmas: torch.Tensor, generator: torch.Generator | None,
               initial: Particles | None = None) -> SMCState:
    """Particles from the noise-end marginal (or given ones), equal weights."""
    z = prior.sample_initial(num_particles, float(sigmas[0]), generator) if initial is None else initial
    if z.shape[0] != num_particles:
        raise ValueError(f"initial particles have {z.shape[0]} rows, expected num_particles={num_particles}")
    return SMCState(z, uniform(num_particles), 0, 0.0, torch.arange(num_particles))


def run(state: SMCState, prior: Prior, reward: fkc.Reward, cfg: FKCConfig, sigmas: torch.Tensor, *,
        generator: torch.Generator | None = None, historical: Particles | None = None,
        noise_fn: NoiseFn = _default_noise) -> Iterator[tuple[SMCState, StepInfo]]:
    """Yield (state, info) after every step until the grid is exhausted."""
    while state.step < cfg.num_steps:
        state, info = step(state, prior, reward, cfg, sigmas, generator=generator, historical=historical,
                           noise_fn=noise_fn)
        yield state, info


def fkc_sample(prior: Prior, reward: fkc.Reward, *, num_particles: int, num_steps: int = 25,
               beta: tuple[float, float] = (0.5, 2.0), gamma: tuple[float, float] = (0.05, 0.0),
               diversity: bool = False, reward_at: str = "xt", resample: str = "systematic",
               ess_threshold: float = 0.5, generator: torch.Generator | None = None,
               jacobian: str = "exact", beta_dot: float | None = None, use_weights: bool = True,
               clamp: float | None = None, historical: Particles | None = None,
               initial: Particles | None = None, noise_fn: NoiseFn = _default_noise,
               progress: bool = False) -> SMCResult:
    """Sample p_0·exp(β_end·r) approximately with FKC-SMC. ``reward``: [N, *event] -> [N], differentiable.

    Returns the final particles [N, *event], normalised log-weights [N] and the per-step trace.
    With ``beta=(0, 0)`` it is the prior's plain ancestral sampler.
    """
    cfg = FKCConfig(num_steps, tuple(beta), tuple(gamma), beta_dot, diversity, reward_at, jacobian, resample,
                    ess_threshold, use_weights, clamp)
    sigmas = prior.sigmas(num_steps)
    state = init_state(prior, num_particles, sigmas, generator, initial)
    trace = []
    for state, info in tqdm(run(state, prior, reward, cfg, sigmas, generator=generator, historical=historical,
                                noise_fn=noise_fn), total=num_steps, disable=not progress, desc="fkc"):
        trace.append(info)
    log_w = normalize(state.log_weights)
    return SMCResult(state.particles, log_w, trace, state.log_normalizer, state.origins)


def sample_prior(prior: Prior, n: int, num_steps: int, generator: torch.Generator | None = None,
                 batch_size: int = 128) -> torch.Tensor:
    """n plain samples (β = 0) drawn in batches and decoded: [n, C, H, W] (or [n, *event])."""
    out = []
    for start in range(0, n, batch_size):
        res = fkc_sample(prior, lambda z: torch.zeros(z.shape[0]), num_particles=min(batch_size, n - start),
                         num_steps=num_steps, beta=(0.0, 0.0), generator=generator)
        out.append(prior.decode(res.particles))
    return torch.cat(out)
