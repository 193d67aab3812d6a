"""What the online peers (FK steering, DAS online, SEIKO-UCB) share: a learned reward refit from
the ratings each round, and the UCB bonus of DAS and SEIKO.

- :func:`feature_reward` builds the reward network every online method here learns: an MLP on the
  prior's own frozen denoiser features of the clean image (``FeatureSurrogate``, the same network
  ``apa align`` uses by default, and the analogue of DAS's and SEIKO's MLP on image embeddings).
  Its initialisation is keyed by (seed, round), as a session's.
- :func:`refit` fits it on every rating so far with the session's fitting settings.
- :class:`FeatureCovariance` is the UCB bonus of DAS online and SEIKO: with φ(x) the reward
  network's last hidden layer and Σ = λ·I + Σ_i φ(x_i)φ(x_i)ᵀ over the rated images,
  bonus(x) = sqrt(φ(x)ᵀ Σ⁻¹ φ(x)), which is large where the ratings so far say little.

Images are particles in the prior's space [N, *event]; ratings are on [-1, 1].
"""

from __future__ import annotations

import torch

from apa.seeding import generator
from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate

FEATURE_T = 200  # the training timestep the prior's features are read at (the session's default)


def feature_reward(prior, seed: int, r: int, loss: str = "mse", members: int = 1) -> Ensemble:
    """A fresh reward network on the prior's denoiser features, initialised from (seed, r)."""
    fn = lambda x: prior.features(x, FEATURE_T)  # noqa: E731
    dim = int(fn(torch.zeros(1, *prior.event_shape)).shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(generator(seed, r, "init").initial_seed()))
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
