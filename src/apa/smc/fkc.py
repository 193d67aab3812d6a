"""Feynman-Kac correctors: the tilted potential, its gradient, the corrected drift and every weight.

Target sequence (SPEC "The mathematics"): q_i ∝ p_i·exp(φ_i), φ_i = β_i·(r + γ_i·L_div), on the
sampler's time grid σ_0 > σ_1 > … > σ_N = 0 (generation order, noise -> data). The move of step
i is the prior's ancestral kernel N(m_i, v_i) shifted by the FKC drift δ_i = (g²·ds/2)·∇φ_i
(SPEC drift; g²·ds = σ_i² − σ_{i+1}² in VE form).

Two weightings of that move (``SamplerConfig.weights``):

``"exact"`` (the default; SPEC "Exact weights at any step count"): the SMC weight of the
discrete transition, as in TDS and DAS,

  log w_0   = φ_0(z_0)
  log w    += φ_{i+1}(z_{i+1}) − φ_i(z_i) + log N(z_{i+1}; m_i, v_i) − log N(z_{i+1}; m_i + δ_i, v_i)
  φ_N       = β_N·(r + γ_N·L_div) at the clean sample z_N itself; no shift where v_i = 0.

With z_{i+1} = m_i + δ_i + √v_i·ξ the proposal log-ratio is −⟨ξ, δ_i⟩/√v_i − ‖δ_i‖²/(2v_i)
(:func:`proposal_log_ratio`). The weighted particles target p_disc(z_N)·exp(φ_N(z_N)), where
p_disc is the terminal law of the prior's own plain discrete sampler, at ANY step count and
for ANY twist φ_i: reading r at ẑ0 with either Jacobian, or the seed's literal gradient,
changes only the variance of the weights, never their target. With L_div on (``diversity``),
φ_i of one particle depends on all the others, so the increments are no longer per-particle
importance weights: the population is then an interacting-particle heuristic whose terminal
law is not p_disc·exp(φ_N) in general (exact again when γ = 0).

``"rate"`` (the seed's; SPEC "The mathematics"): the continuous-time rate integrated over each
step by the left-point rule,

  log w(z_T) = φ_0(z_T),   d log w = ∂_sφ ds − ⟨∇φ, f⟩ds + ⟨∇φ, (g²/2)·score⟩ds

exact only in the limit of many steps when r is read at z_t (benchmarks/exactness.py measures
the bias: 12x the Monte Carlo floor at 25 steps).

``reward_at="tweedie"`` reads r at ẑ0 = z − σ·ε (the seed's choice) and takes ∇_z by the chain
rule: through the denoiser (``jacobian="exact"``), by the Gaussian-data Jacobian s²/(s²+σ²)
(``"gaussian"``), or not at all (``"identity"``, the seed's literal reading: it breaks a DDPM
prior at high σ; kept for compatibility only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from apa.config import SamplerConfig
from apa.priors.base import Prior
from apa.smc.diversity import diversity
from apa.types import Particles

Reward = Callable[[Particles], torch.Tensor]


def linear_schedule(start: float, end: float, num_steps: int) -> torch.Tensor:
    """Values on the num_steps + 1 points of the time grid, linear from start to end: [num_steps + 1]."""
    return torch.linspace(float(start), float(end), num_steps + 1, dtype=torch.float64)


def signal_schedule(start: float, end: float, sigmas: torch.Tensor, data_std: float) -> torch.Tensor:
    """β_i = start + (end − start)·s²/(s² + σ_i²) on the grid σ_i [num_steps + 1] -> [num_steps + 1].

    s²/(s² + σ²) is the share of ẑ0 that is signal for data of per-coordinate std s (the Gaussian
    Jacobian): the tilt grows as the Tweedie estimate the reward reads becomes informative, so at
    high noise, where r(ẑ0) of a blur varies across particles without saying which image it will
    become, the weights do not select (and collapse) the population. It reaches ``end`` at σ = 0."""
    s2 = float(data_std) ** 2
    signal = s2 / (s2 + sigmas.double() ** 2)
    return float(start) + (float(end) - float(start)) * signal


@dataclass(frozen=True)
class Schedule:
    """The time grid of one run, built once: σ_i, β_i, γ_i, each [steps + 1] (index i = point i)."""

    sigmas: torch.Tensor
    betas: torch.Tensor
    gammas: torch.Tensor
    # the same values as Python floats, read once when the schedule is built (no tensor read per step)
    host: tuple[list[float], list[float], list[float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", (self.sigmas.tolist(), self.betas.tolist(), self.gammas.tolist()))

    @classmethod
    def of(cls, prior: Prior, cfg: SamplerConfig) -> "Schedule":
        sigmas = prior.sigmas(cfg.steps)
        betas = (linear_schedule(*cfg.beta, cfg.steps) if cfg.beta_schedule == "linear"
                 else signal_schedule(*cfg.beta, sigmas, prior.data_std))
        return cls(sigmas, betas, linear_schedule(*cfg.gamma, cfg.steps))

    def at(self, i: int) -> tuple[float, float, float, float]:
        """(σ_i, σ_{i+1}, β_i, γ_i) as Python floats."""
        sig, beta, gamma = self.host
        return sig[i], sig[i + 1], beta[i], gamma[i]

    def beta_gamma(self, i: int) -> tuple[float, float]:
        """(β_i, γ_i) at grid point i (negative i counts from the end) as Python floats."""
        return self.host[1][i], self.host[2][i]


@dataclass(frozen=True)
class PotentialEval:
    """Everything one step needs at the current particles z [N, *event]."""

    eps: Particles  # ε̂(z, σ)
    reward: torch.Tensor  # r(u) [N], u = z or ẑ0
    div: torch.Tensor  # L_div(u) [N] (zeros when diversity is off)
    grad: Particles | None  # ∇_z (r + γ·L_div)(u(z)), NOT multiplied by β; None when not asked for

    def potential(self, beta: float, gamma: float) -> torch.Tensor:
        """φ = β·(r + γ·L_div) at these particles: [N] float64."""
        return potential(beta, gamma, self.reward, self.div)

    def apply(self, take: Callable[[torch.Tensor], torch.Tensor]) -> "PotentialEval":
        """``take`` ([N, ...] -> [M, ...], e.g. the ancestors' rows) applied to every quantity."""
        return PotentialEval(take(self.eps), take(self.reward), take(self.div),
                             None if self.grad is None else take(self.grad))


def _reduce(x: Particles) -> torch.Tensor:
    """Sum over the event dimensions: [N, *event] -> [N]."""
    return x.reshape(x.shape[0], -1).sum(1)


def potential(beta: float, gamma: float, reward: torch.Tensor, div: torch.Tensor) -> torch.Tensor:
    """φ = β·(r + γ·L_div) from the reward [N] and the diversity term [N]: [N] float64."""
    return beta * (reward.double() + gamma * div.double())


def check_finite(values: torch.Tensor, what: str, step: int, deferred: "Deferred | None" = None) -> None:
    """Raise FloatingPointError naming the particles whose ``values`` [N] are not finite; with a
    ``deferred`` collector, record the check on the device instead (read back at the run's end)."""
    if deferred is not None:
        deferred.add(values, what, step)
        return
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        raise FloatingPointError(f"step {step}: {what} is not finite for particles {bad[:8].tolist()}"
                                 f"{' ...' if bad.numel() > 8 else ''}; the sampler stopped instead of "
                                 "carrying NaN particles forward (check the reward function and its inputs)")


@dataclass
class Deferred:
    """Finite-value checks of one run, kept on the device and read back once at its end.

    On a GPU, raising at once would read every checked tensor back to the host at every step (a
    device sync each time); a run with a collector records which values were not finite and
    :meth:`raise_first` raises the first problem, with the same message, after the last step.
    Non-finite particles are then carried to the end of the run, but never returned.
    """

    pending: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)

    def add(self, values: torch.Tensor, what: str, step: int) -> None:
        self.pending.append((step, what, values.detach()))

    def raise_first(self) -> None:
        """One host read for the whole run; raises FloatingPointError for the first failed check."""
        if not self.pending:
            return
        flags = torch.stack([(~torch.isfinite(v)).any() for _, _, v in self.pending]).tolist()
        for (step, what, values), bad in zip(self.pending, flags):
            if bad:
                check_finite(values, what, step)


def evaluate_potential(prior: Prior, reward: Reward, z: Particles, sigma: float, gamma: float,
                       cfg: SamplerConfig, *, historical: Particles | None, step: int,
                       need_grad: bool = True, deferred: Deferred | None = None) -> PotentialEval:
    """ε, r, L_div and (if ``need_grad``) ∇_z(r + γ·L_div) at z [N, *event] and noise level σ (r and
    L_div read at z or at its Tweedie estimate ẑ0)."""
    through_denoiser = need_grad and cfg.reward_at == "tweedie" and cfg.jacobian == "exact"
    with torch.enable_grad():
        if through_denoiser:
            zg = z.detach().requires_grad_(True)
            eps = prior.eps(zg, sigma)
            u = x0 = prior.tweedie(zg, sigma, eps)  # ẑ0(z), differentiable in z through the network
            wrt = zg
        else:
            with torch.no_grad():
                eps = prior.eps(z, sigma)
                x0 = prior.tweedie(z, sigma, eps)
            u = wrt = (z if cfg.reward_at == "xt" else x0).detach().requires_grad_(need_grad)
        r = reward(u).reshape(-1)
        check_finite(r.detach(), "the reward", step, deferred)
        div = diversity(u, historical) if cfg.diversity else torch.zeros_like(r)
        grad = torch.autograd.grad((r + gamma * div).sum(), wrt)[0].detach() if need_grad else None
    if grad is not None and cfg.reward_at == "tweedie" and cfg.jacobian == "gaussian":
        s2 = prior.data_std**2
        grad = grad * (s2 / (s2 + sigma**2))  # ∂ẑ0/∂z ≈ s²/(s²+σ²) for Gaussian data
    if grad is not None:
        check_finite(_reduce(grad), "the reward gradient", step, deferred)
    return PotentialEval(eps.detach(), r.detach(), div.detach(), grad)


def clean_potential(reward: Reward, z: Particles, beta: float, gamma: float, cfg: SamplerConfig,
                    historical: Particles | None, step: int, deferred: Deferred | None = None) -> torch.Tensor:
    """φ_N = β_N·(r + γ_N·L_div) at clean particles z [N, *event] (the one reward call at the end): [N]."""
    with torch.no_grad():
        r = reward(z).reshape(-1)
        check_finite(r, "the reward of the clean sample", step, deferred)
        div = diversity(z, historical) if cfg.diversity else torch.zeros_like(r)
    return potential(beta, gamma, r, div)


def drift_shift(grad_phi: Particles, g2_ds: float) -> Particles:
    """The FKC correction to the move over one step: δ = (g²·ds/2)·∇φ. [N, *event]."""
    return 0.5 * g2_ds * grad_phi


def proposal_log_ratio(noise: Particles, shift: Particles, variance: float) -> torch.Tensor:
    """log N(z'; m, v) − log N(z'; m + δ, v) at z' = m + δ + √v·ξ, i.e. −⟨ξ, δ⟩/√v − ‖δ‖²/(2v). -> [N] float64.

    noise ξ [N, *event] (standard normal), shift δ [N, *event], variance v > 0 per coordinate.
    """
    xi, d = noise.double(), shift.double()
    return -_reduce(xi * d) / variance**0.5 - _reduce(d * d) / (2.0 * variance)


def rate_increment(cfg: SamplerConfig, pe: PotentialEval, prior: Prior, z: Particles, i: int,
                   sched: Schedule, grad_phi: Particles) -> torch.Tensor:
    """The seed's log-weight increment of step i: [N] float64 (plus the start φ_0(z_0) when i = 0).

    ∂_sφ·ds − ⟨∇φ, f⟩ds + ⟨∇φ, (g²/2)·score⟩ds with everything read at z_i (SPEC weights).
    """
    sig, sig_next, b0, g0 = sched.at(i)
    b1, g1 = sched.beta_gamma(i + 1)
    if cfg.beta_dot is None:
        dphi = (b1 - b0) * pe.reward.double() + (b1 * g1 - b0 * g0) * pe.div.double()  # φ_{i+1} − φ_i at fixed z
    else:
        dphi = cfg.beta_dot / cfg.steps * (pe.reward.double() + g0 * pe.div.double())  # seed: β_dot·(r + γ·L_div)·ds
    score = prior.score(z, sig, pe.eps)
    g2_ds = prior.g2_ds(sig, sig_next)
    inner_f = _reduce(grad_phi * prior.forward_drift(z, sig, sig_next)).double()
    inner_score = _reduce(grad_phi * score).double()
    inc = dphi - inner_f + 0.5 * g2_ds * inner_score
    return inc + pe.potential(b0, g0) if i == 0 else inc  # start: log w(z_T) = φ_0(z_T)
