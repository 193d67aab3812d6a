"""③ Which k of the n particles the user rates: plain functions ``(ctx, k, generator) -> idx [k]``.

Particles that are identical (copies made by resampling) count once, with their weights summed,
so no particle is ever shown twice; when fewer than k distinct particles exist, all are shown.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from apa.registry import ACQUISITIONS
from apa.smc.weights import probabilities
from apa.types import Indices, LogWeights, Particles


@dataclass(frozen=True)
class Candidates:
    particles: Particles  # [N, *event] clean particles (what would be shown)
    log_weights: LogWeights  # [N]
    surrogate: Callable[[Particles], torch.Tensor] | None = None  # mean reward [N]
    spread: Callable[[Particles], torch.Tensor] | None = None  # uncertainty [N]


def distinct(particles: Particles) -> tuple[Indices, Indices]:
    """(first index of each distinct particle [U], group of every particle [N])."""
    _, group = torch.unique(particles.reshape(particles.shape[0], -1), dim=0, return_inverse=True)
    first = torch.full((int(group.max()) + 1,), particles.shape[0], dtype=torch.long)
    first = first.scatter_reduce(0, group, torch.arange(particles.shape[0]), reduce="amin")
    return first, group


def _group_weights(c: Candidates, first: Indices, group: Indices) -> torch.Tensor:
    w = probabilities(c.log_weights)
    return torch.zeros(first.shape[0], dtype=w.dtype).index_add_(0, group, w)


def by_weight(c: Candidates, k: int, generator: torch.Generator | None) -> Indices:
    """The k heaviest distinct particles (ties broken by index)."""
    first, group = distinct(c.particles)
    gw = _group_weights(c, first, group)
    order = torch.argsort(-gw, stable=True)[:k]
    return first[order]


def random(c: Candidates, k: int, generator: torch.Generator | None) -> Indices:
    """k distinct particles uniformly at random."""
    first, _ = distinct(c.particles)
    return first[torch.randperm(first.shape[0], generator=generator)[:k]]


def weighted(c: Candidates, k: int, generator: torch.Generator | None) -> Indices:
    """k distinct particles drawn by their summed weights without replacement (successive draws, each
    in proportion to the weight of the particles not yet drawn): a round shows what the weighted
    population holds, in its proportions, and never a particle the weights have left behind while a
    weighted one remains. Particles of weight zero fill the rest at random."""
    first, group = distinct(c.particles)
    gw = _group_weights(c, first, group)
    heavy = (gw > 0).nonzero().flatten()
    take = min(k, heavy.numel())
    drawn = heavy[torch.multinomial(gw[heavy], take, replacement=False, generator=generator)] if take else heavy
    rest = (gw <= 0).nonzero().flatten()
    rest = rest[torch.randperm(rest.numel(), generator=generator)[:k - take]]
    return first[torch.cat([drawn, rest])]


def ucb(c: Candidates, k: int, generator: torch.Generator | None, kappa: float = 1.0) -> Indices:
    """Upper confidence bound mean + κ·spread of the surrogate ensemble, over distinct particles."""
    if c.surrogate is None or c.spread is None:
        return by_weight(c, k, generator)
    first, _ = distinct(c.particles)
    with torch.no_grad():
        x = c.particles[first]
        score = c.surrogate(x) + kappa * c.spread(x)
    return first[torch.argsort(-score, stable=True)[:k]]


def unsure(c: Candidates, k: int, generator: torch.Generator | None) -> Indices:
    """The k distinct particles the surrogate is least sure of: its predicted rating nearest 0 (for the
    logistic surrogate, P(liked | x) nearest 1/2), ties by index; at random before any surrogate."""
    if c.surrogate is None:
        return random(c, k, generator)
    first, _ = distinct(c.particles)
    with torch.no_grad():
        doubt = c.surrogate(c.particles[first]).abs()
    return first[torch.argsort(doubt, stable=True)[:k]]


def diverse(c: Candidates, k: int, generator: torch.Generator | None) -> Indices:
    """Farthest-point selection in particle space, starting from the heaviest particle."""
    first, group = distinct(c.particles)
    flat = c.particles[first].reshape(first.shape[0], -1).double()
    heaviest = int(torch.argmax(_group_weights(c, first, group)))
    rest = farthest_from(flat, flat[heaviest:heaviest + 1], min(k, first.shape[0]) - 1)
    return first[torch.cat([torch.tensor([heaviest]), rest])]


def farthest_from(points: torch.Tensor, seen: torch.Tensor, k: int) -> Indices:
    """k indices into ``points`` [P, D] chosen greedily, each the point farthest from ``seen`` [m, D] and
    from the points already chosen (with nothing seen, point 0 first). Coverage: the next image is the one
    least like anything seen."""
    k = min(k, points.shape[0])
    if seen.shape[0]:
        dist, chosen = torch.cdist(points, seen).min(dim=1).values, []
    else:
        dist, chosen = (points - points[0]).norm(dim=1), [0]
    dist[chosen] = -1.0
    while len(chosen) < k:
        nxt = int(torch.argmax(dist))
        chosen.append(nxt)
        dist = torch.minimum(dist, (points - points[nxt]).norm(dim=1))
        dist[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.long)


for _name, _rule in (("weight", by_weight), ("random", random), ("weighted", weighted), ("ucb", ucb),
                     ("unsure", unsure), ("diverse", diverse)):
    ACQUISITIONS.register(_name)(_rule)


def select(name: str, c: Candidates, k: int, generator: torch.Generator | None = None) -> Indices:
    if name not in ACQUISITIONS:
        raise ValueError(f"unknown acquisition {name!r}; choose one of {', '.join(ACQUISITIONS)}")
    idx = ACQUISITIONS.get(name)(c, k, generator)
    assert idx.unique().numel() == idx.numel()
    return idx


def balanced_weights(features: torch.Tensor) -> torch.Tensor:
    """Weights [m] ∝ 1 / local density of m points [m, d]: a Gaussian kernel whose bandwidth is the
    median distance to the k-th nearest neighbour, k = ⌈√m⌉. A crowded mode and a sparse one then get
    comparable total weight (equal in the limit of well-separated modes)."""
    f = features.reshape(features.shape[0], -1).double()
    m = f.shape[0]
    if m < 2:
        return torch.ones(m, dtype=torch.float64)
    d2 = torch.cdist(f, f).square()
    k = min(m - 1, math.ceil(math.sqrt(m)))
    h2 = d2.sort(dim=1).values[:, k].median().clamp_min(1e-12)  # column 0 is each point itself
    density = torch.exp(-d2 / (2.0 * h2)).sum(1)
    return 1.0 / density
