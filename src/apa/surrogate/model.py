"""⑤ The surrogate reward r_θ: what the sampler steers by, refit from the ratings after every round.

- ``LatentSurrogate``: the seed's network on the clean estimate ẑ0 (pixels or SD latents):
  Conv2d(C→128) → AdaptiveAvgPool2d → MLP 128→256→128→1.
- ``FeatureSurrogate``: a small MLP on the prior's own denoiser features of ẑ0 (the pooled
  mid-block of the DDPM UNet at a low noise level). The feature map is frozen and differentiable,
  so ∇r flows back through the UNet's down path.
- ``Ensemble``: M members of either kind, fitted by one of two losses (``LOSSES``):
  - ``mse``: each member regresses the rating on the [-1, 1] scale (the seed's); the reward is
    the members' mean rating.
  - ``logistic``: each member's output is the logit of P(liked | x), fitted by cross-entropy to
    the rating read as a probability (y + 1) / 2; the reward is the log of the members' mean
    probability, r = log P(liked | x) (the posterior view: at β = 1, p(x)·P(liked | x) ∝
    p(x | liked), the prior's own proportions among what the user likes).
  The spread over members is an uncertainty for acquisition.
All map particles [N, *event] to rewards [N].
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from apa.types import Particles


class LatentSurrogate(nn.Module):
    """The seed's LatentSurrogate. x [N, C, H, W] -> [N]."""

    def __init__(self, channels: int, width: int = 128, hidden: int = 256):
        super().__init__()
        self.conv = nn.Conv2d(channels, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.ReLU(),
                                 nn.Linear(width, 1))

    def forward(self, x: Particles) -> torch.Tensor:
        h = self.pool(torch.relu(self.conv(x))).flatten(1)
        return self.mlp(h).squeeze(1)


class FeatureSurrogate(nn.Module):
    """An MLP on frozen, differentiable features φ(x) [N, D]: x [N, ...] -> [N].

    ``features`` is not a registered submodule: it belongs to the prior, is never trained and is
    not saved with the surrogate's state.
    """

    def __init__(self, features: Callable[[Particles], torch.Tensor], dim: int, hidden: int = 128):
        super().__init__()
        self._features = [features]  # a list keeps the prior's network out of this module's state
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def embed(self, x: Particles) -> torch.Tensor:
        return self._features[0](x)

    def head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(feats)).squeeze(1)

    def forward(self, x: Particles) -> torch.Tensor:
        return self.head(self.embed(x))


LOSSES = ("mse", "logistic")  # what a member's output means: a rating in [-1, 1], or the logit of P(liked | x)


class Ensemble(nn.Module):
    """M surrogates fitted by ``loss``: ``forward`` is the reward r [N] the sampler tilts by,
    ``rating`` the predicted rating on [-1, 1] [N], ``spread`` the std of the members' ratings [N]."""

    def __init__(self, members: list[nn.Module], loss: str = "mse"):
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"unknown surrogate loss {loss!r}; choose one of {', '.join(LOSSES)}")
        self.members = nn.ModuleList(members)
        self.loss = loss

    def all(self, x: Particles) -> torch.Tensor:
        """[M, N] member predictions."""
        if isinstance(self.members[0], FeatureSurrogate):
            feats = self.members[0].embed(x)  # shared frozen features: computed once
            return torch.stack([m.head(feats) for m in self.members])
        return torch.stack([m(x) for m in self.members])

    def member_ratings(self, x: Particles) -> torch.Tensor:
        """[M, N] each member's predicted rating on [-1, 1] (2·P(liked) − 1 for the logistic loss)."""
        out = self.all(x)
        return out if self.loss == "mse" else 2.0 * torch.sigmoid(out) - 1.0

    def forward(self, x: Particles) -> torch.Tensor:
        """The reward r [N]: the mean rating (mse), or log of the mean P(liked | x) (logistic),
        computed as logsumexp_m log σ(f_m) − log M so it stays finite far from the liked images."""
        out = self.all(x)
        if self.loss == "mse":
            return out.mean(0)
        return torch.logsumexp(nn.functional.logsigmoid(out), 0) - math.log(out.shape[0])

    def rating(self, x: Particles) -> torch.Tensor:
        """[N] the predicted rating on [-1, 1]: what the held-out score compares with the user's."""
        return self.member_ratings(x).mean(0)

    def spread(self, x: Particles) -> torch.Tensor:
        p = self.member_ratings(x)
        return p.std(0) if p.shape[0] > 1 else torch.zeros(p.shape[1], device=p.device)
