"""A variance-exploding diffusion of an isotropic Gaussian mixture: the exactness reference.

Data p_0 = Σ_k π_k N(m_k, s_k² I). At noise level σ the marginal is p_σ = Σ_k π_k N(m_k, (s_k²+σ²) I),
so the score, ε = −σ·score and the noise-end distribution are all exact. With a linear reward
r(z) = ⟨a, z⟩ the tilted target p_0·exp(β·r) is again a mixture (:meth:`tilted`).
"""

from __future__ import annotations

import math

import torch

from apa.priors.base import VEPrior
from apa.registry import PRIORS
from apa.types import Particles


class GaussianMixturePrior(VEPrior):
    """means [K, d], stds [K], weights [K] (normalised internally). Particles [N, d]."""

    def __init__(self, means, stds, weights, sigma_max: float | None = None, sigma_min: float = 1e-3):
        self.means = torch.as_tensor(means, dtype=torch.float32)
        self.stds = torch.as_tensor(stds, dtype=torch.float32)
        w = torch.as_tensor(weights, dtype=torch.float32)
        self.weights = w / w.sum()
        if self.means.ndim != 2 or self.stds.shape != self.weights.shape or self.stds.shape[0] != self.means.shape[0]:
            raise ValueError("expected means [K, d], stds [K], weights [K]")
        self.event_shape = (self.means.shape[1],)
        # p_σmax is sampled exactly at any σ_max, so the noise end need not be far out; a large
        # σ_max only spreads the start weights exp(β_start·r(z_T)) when r is read at z_t.
        spread = float((self.means - self.weights @ self.means).norm(dim=1).max() + self.stds.max())
        self.sigma_max = float(sigma_max) if sigma_max is not None else spread
        self.sigma_min = float(sigma_min)
        self.data_std = float(self._moments()[1].diagonal().mean().sqrt())
        self.name = "gmm"

    def _moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moments(self.means, self.stds, self.weights)

    @staticmethod
    def moments(means: torch.Tensor, stds: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [d] and covariance [d, d] of a mixture Σ π_k N(m_k, s_k² I)."""
        mean = weights @ means
        centred = means - mean
        d = means.shape[1]
        cov = (weights[:, None, None] * (centred[:, :, None] * centred[:, None, :])).sum(0)
        return mean, cov + (weights * stds**2).sum() * torch.eye(d)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """Geometric from σ_max to σ_min over num_steps points, then 0: [num_steps + 1]."""
        geo = torch.logspace(math.log10(self.sigma_max), math.log10(self.sigma_min), num_steps)
        return torch.cat([geo, torch.zeros(1)])

    def sample_initial(self, n: int, sigma: float, generator: torch.Generator | None = None) -> Particles:
        """Exact draws from p_σ: a component k ~ π, then m_k + √(s_k²+σ²)·ξ."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        xi = torch.randn((n, self.event_shape[0]), generator=generator)
        return self.means[k] + (self.stds[k] ** 2 + sigma**2).sqrt()[:, None] * xi

    def responsibilities(self, z: Particles, sigma: float) -> torch.Tensor:
        """P(component k | z) under p_σ: [N, K]."""
        var = self.stds**2 + sigma**2  # [K]
        d = z.shape[1]
        sq = ((z[:, None, :] - self.means[None]) ** 2).sum(-1)  # [N, K]
        logp = torch.log(self.weights) - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * sq / var
        return torch.softmax(logp, dim=1)

    def eps(self, z: Particles, sigma: float) -> Particles:
        """ε = −σ·∇log p_σ(z), with ∇log p_σ = Σ_k ρ_k(z)·(m_k − z)/(s_k²+σ²). Differentiable in z."""
        var = self.stds**2 + sigma**2
        rho = self.responsibilities(z, sigma)
        score = ((rho / var)[:, :, None] * (self.means[None] - z[:, None, :])).sum(1)
        return -sigma * score

    def decode(self, z0: Particles) -> Particles:
        return z0

    def tilted(self, direction: torch.Tensor, beta: float) -> "GaussianMixturePrior":
        """p_0·exp(β·⟨a, z⟩) as a mixture: m_k + β s_k² a, weights ∝ π_k exp(β⟨a, m_k⟩ + β² s_k²‖a‖²/2)."""
        a = torch.as_tensor(direction, dtype=torch.float32)
        means = self.means + beta * self.stds[:, None] ** 2 * a[None]
        logw = torch.log(self.weights) + beta * self.means @ a + 0.5 * beta**2 * self.stds**2 * (a @ a)
        return GaussianMixturePrior(means, self.stds, torch.softmax(logw, 0), self.sigma_max, self.sigma_min)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Particles:
        """Exact i.i.d. draws from p_0: [n, d]."""
        return self.sample_initial(n, 0.0, generator)


@PRIORS.register("gmm")
def make_gmm(options: dict) -> GaussianMixturePrior:
    """The 2-D, three-component mixture used by the exactness tests and benchmark."""
    return GaussianMixturePrior([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], [0.5, 0.7, 0.4], [0.5, 0.3, 0.2])
