"""⑤ The surrogate reward r_θ: what the sampler steers by, refit from the ratings after every round.

- ``LatentSurrogate``: the seed's network on the clean estimate ẑ0 (pixels or SD latents):
  Conv2d(C→128) → AdaptiveAvgPool2d → MLP 128→256→128→1.
- ``FeatureSurrogate``: a small MLP on the prior's own denoiser features of ẑ0 (the pooled
  mid-block of the DDPM UNet at a low noise level). The feature map is frozen and differentiable,
  so ∇r flows back through the UNet's down path.
- ``Ensemble``: M members of either kind; the mean is the reward, the spread and the margin |r|
  are uncertainties for acquisition.
All map particles [N, *event] to rewards [N].
"""

from __future__ import annotations

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


class Ensemble(nn.Module):
    """M surrogates; forward is the mean [N]; ``spread`` the std over members [N]."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def all(self, x: Particles) -> torch.Tensor:
        """[M, N] member predictions."""
        if isinstance(self.members[0], FeatureSurrogate):
            feats = self.members[0].embed(x)  # shared frozen features: computed once
            return torch.stack([m.head(feats) for m in self.members])
        return torch.stack([m(x) for m in self.members])

    def forward(self, x: Particles) -> torch.Tensor:
        return self.all(x).mean(0)

    def spread(self, x: Particles) -> torch.Tensor:
        p = self.all(x)
        return p.std(0) if p.shape[0] > 1 else torch.zeros(p.shape[1], device=p.device)
