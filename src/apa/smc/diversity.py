"""The diversity potential L_div and its gradient (SPEC; seed "Diversity Loss").

L_div(z_i) = (1/d)·(1/m)·Σ_{j∈others(i)} ‖z_i − z_j‖², others(i) = the other n−1 particles and,
optionally, H historical particles (m = n − 1 + H). The others are held fixed (detached): each
particle is pushed away from the current population and from what the user has already seen.
"""

from __future__ import annotations

import torch

from apa.types import Particles


def diversity(u: Particles, historical: Particles | None = None) -> torch.Tensor:
    """L_div for every particle. u [N, *event] (differentiable), historical [H, *event] -> [N].

    Uses Σ_j ‖u_i − o_j‖² = n_o·‖u_i‖² − 2⟨u_i, Σ_j o_j⟩ + Σ_j ‖o_j‖² over the detached population
    o (which contains u_i itself: that term is zero in value and in gradient), so the cost is
    O(N·d) rather than O(N²·d).
    """
    n = u.shape[0]
    d = u[0].numel()
    flat = u.reshape(n, -1)
    others = flat.detach()
    if historical is not None and historical.shape[0] > 0:
        others = torch.cat([others, historical.reshape(historical.shape[0], -1).to(flat)])
    m = others.shape[0] - 1  # every particle excludes itself
    if m < 1:
        return torch.zeros(n, dtype=flat.dtype)
    sq = (flat**2).sum(1)
    total = others.shape[0] * sq - 2.0 * flat @ others.sum(0) + (others**2).sum()
    return total / (d * m)
