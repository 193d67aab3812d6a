"""Resampling schemes, one signature: ``(generator, log_weights [N], num_samples) -> ancestors [M] int64``.

Each is unbiased: E[#copies of i] = M·w_i. The uniforms are drawn on the weights' device with the
given generator (which must live there); systematic, stratified and multinomial never read a
value back to the host, residual reads its number of deterministic copies (one sync). The decision *whether* to resample is separate
(:func:`ess_threshold`). Cumulative sums are taken in float64 and the last entry is set to 1
exactly, so a cumulative sum ending below 1 in low precision cannot index past the end.
"""

from __future__ import annotations

from typing import Callable

import torch

from apa.registry import RESAMPLERS
from apa.smc.weights import ess, probabilities
from apa.types import Indices, LogWeights

Resampler = Callable[[torch.Generator | None, LogWeights, int], Indices]


def _cdf(log_weights: LogWeights) -> torch.Tensor:
    cdf = torch.cumsum(probabilities(log_weights), dim=0)
    cdf[-1] = 1.0
    return cdf


def _search(cdf: torch.Tensor, u: torch.Tensor) -> Indices:
    """Smallest i with cdf[i] > u (right-continuous inverse), never beyond N-1."""
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[0] - 1)


def multinomial(generator: torch.Generator | None, log_weights: LogWeights, num_samples: int) -> Indices:
    """M independent draws from Categorical(w)."""
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64, device=log_weights.device)
    return _search(_cdf(log_weights), u)


def stratified(generator: torch.Generator | None, log_weights: LogWeights, num_samples: int) -> Indices:
    """One uniform in each stratum [(m)/M, (m+1)/M)."""
    dev = log_weights.device
    u = (torch.arange(num_samples, dtype=torch.float64, device=dev)
         + torch.rand(num_samples, generator=generator, dtype=torch.float64, device=dev)) / num_samples
    return _search(_cdf(log_weights), u)


def systematic(generator: torch.Generator | None, log_weights: LogWeights, num_samples: int) -> Indices:
    """One shared uniform offset: u_m = (m + U)/M (the default; lowest variance in practice)."""
    u0 = torch.rand(1, generator=generator, dtype=torch.float64, device=log_weights.device)
    u = (torch.arange(num_samples, dtype=torch.float64, device=u0.device) + u0) / num_samples
    return _search(_cdf(log_weights), u)


def residual(generator: torch.Generator | None, log_weights: LogWeights, num_samples: int) -> Indices:
    """floor(M·w_i) deterministic copies, the remainder drawn multinomially from the residual weights."""
    w = probabilities(log_weights)
    copies = torch.floor(num_samples * w).long()
    det = torch.repeat_interleave(torch.arange(w.shape[0], device=w.device), copies)
    rest = num_samples - int(copies.sum())
    if rest == 0:
        return det
    resid = num_samples * w - copies
    extra = multinomial(generator, torch.log(resid.clamp_min(0.0)), rest)
    return torch.cat([det, extra])


for _name, _scheme in (("systematic", systematic), ("stratified", stratified), ("residual", residual),
                      ("multinomial", multinomial)):
    RESAMPLERS.register(_name)(_scheme)


def get_resampler(name: str) -> Resampler:
    if name not in RESAMPLERS:
        raise ValueError(f"unknown resampling scheme {name!r}; choose one of {', '.join(RESAMPLERS)} or 'none'")
    return RESAMPLERS.get(name)


def ess_threshold(log_weights: LogWeights, threshold: float) -> bool:
    """Resample when ESS < threshold·N (threshold 0: never; threshold 1: almost always)."""
    return should_resample(ess(log_weights), log_weights.shape[0], threshold)


def should_resample(ess_value: float | torch.Tensor, n: int, threshold: float) -> bool:
    """ESS < threshold·N for an ESS already computed. On a GPU this reads one scalar back: the
    sampler's only host read per step (the branch decides whether the resampler draws)."""
    return bool(ess_value < threshold * n)
