"""Feynman-Kac correctors: the tilted potential, its gradient, the corrected drift and the weights.

Target sequence (SPEC "The mathematics"): q_s ∝ p_s·exp(φ_s), φ_s = β_s·(r + γ_s·L_div), in
generation time s (noise -> data). For dz = u ds + g dW with u = −f + g²·score:

  drift       dz = [g²·score + (g²/2)·∇φ_s − f] ds + g dW                         (SPEC drift)
  log-weight  d log w = ∂_sφ ds − ⟨∇φ_s, f⟩ ds + ⟨∇φ_s, (g²/2)·score⟩ ds         (SPEC weights)
  start       log w(z_T) = φ_start(z_T) = β_start·r(z_T)                         (SPEC start)

The equations follow from the Fokker-Planck equation of the corrected SDE and are exact when r
is evaluated at z itself. ``reward_at="tweedie"`` evaluates r at ẑ0 = z − σ·ε (the seed's
choice) and then takes ∇_z by the chain rule: through the denoiser (``jacobian="exact"``), by
the Gaussian-data Jacobian s²/(s²+σ²) (``"gaussian"``), or not at all (``"identity"``, the
seed's literal reading: it breaks a DDPM prior at high σ; kept for compatibility only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from apa.priors.base import Prior
from apa.smc.diversity import diversity
from apa.types import Particles

Reward = Callable[[Particles], torch.Tensor]
REWARD_AT = ("xt", "tweedie")
JACOBIANS = ("exact", "gaussian", "identity")


def linear_schedule(start: float, end: float, num_steps: int) -> torch.Tensor:
    """Values on the num_steps + 1 points of the time grid, linear from start to end: [num_steps + 1]."""
    return torch.linspace(float(start), float(end), num_steps + 1, dtype=torch.float64)


@dataclass(frozen=True)
class PotentialEval:
    """Everything one step needs at the current particles z [N, *event]."""

    eps: Particles  # ε̂(z, σ)
    x0: Particles  # Tweedie ẑ0
    reward: torch.Tensor  # r(u) [N], u = z or ẑ0
    div: torch.Tensor  # L_div(u) [N] (zeros when diversity is off)
    grad: Particles  # ∇_z (r + γ·L_div)(u(z)), NOT multiplied by β


def _reduce(x: Particles) -> torch.Tensor:
    """Sum over the event dimensions: [N, *event] -> [N]."""
    return x.reshape(x.shape[0], -1).sum(1)


def _check_finite(values: torch.Tensor, what: str, step: int) -> None:
    bad = (~torch.isfinite(values)).nonzero().flatten()
    if bad.numel():
        raise FloatingPointError(f"step {step}: {what} is not finite for particles {bad[:8].tolist()}"
                                 f"{' ...' if bad.numel() > 8 else ''}; the sampler stopped instead of "
                                 "carrying NaN particles forward (check the reward function and its inputs)")


def evaluate_potential(prior: Prior, reward: Reward, z: Particles, sigma: float, gamma: float, *,
                       reward_at: str, jacobian: str, use_diversity: bool, historical: Particles | None,
                       step: int) -> PotentialEval:
    """ε, ẑ0, r, L_div and ∇_z(r + γ·L_div) at z [N, *event] and noise level σ."""
    through_denoiser = reward_at == "tweedie" and jacobian == "exact"
    with torch.enable_grad():
        if through_denoiser:
            zg = z.detach().requires_grad_(True)
            eps = prior.eps(zg, sigma)
            u = x0 = zg - sigma * eps  # ẑ0(z), differentiable in z through the network
            wrt = zg
        else:
            with torch.no_grad():
                eps = prior.eps(z, sigma)
                x0 = z - sigma * eps
            u = wrt = (z if reward_at == "xt" else x0).detach().requires_grad_(True)
        r = reward(u).reshape(-1)
        _check_finite(r.detach(), "the reward", step)
        div = diversity(u, historical) if use_diversity else torch.zeros_like(r)
        (grad,) = torch.autograd.grad((r + gamma * div).sum(), wrt)
    if reward_at == "tweedie" and jacobian == "gaussian":
        s2 = prior.data_std**2
        grad = grad * (s2 / (s2 + sigma**2))  # ∂ẑ0/∂z ≈ s²/(s²+σ²) for Gaussian data
    _check_finite(_reduce(grad), "the reward gradient", step)
    return PotentialEval(eps.detach(), x0.detach(), r.detach(), div.detach(), grad.detach())


def drift_shift(grad_phi: Particles, g2_ds: float) -> Particles:
    """The FKC correction to the move over one step: (g²·ds/2)·∇φ. [N, *event]."""
    return 0.5 * g2_ds * grad_phi


def log_weight_increment(dphi: torch.Tensor, grad_phi: Particles, score: Particles, f_ds: Particles,
                         g2_ds: float) -> torch.Tensor:
    """∂_sφ·ds − ⟨∇φ, f⟩ds + ⟨∇φ, (g²/2)·score⟩ds over one step (SPEC weights). -> [N] float64.

    dphi [N]: the change of φ from the schedule over the step at fixed z (∂_sφ·ds).
    """
    inner_f = _reduce(grad_phi * f_ds)
    inner_score = _reduce(grad_phi * score)
    return dphi.double() - inner_f.double() + 0.5 * g2_ds * inner_score.double()
