"""Log-space importance weights: normalisation, ESS, log-mean-exp. The only place these live."""

from __future__ import annotations

import math

import torch

from apa.types import LogWeights


def normalize(log_weights: LogWeights) -> LogWeights:
    """log w_i − logsumexp(log w): normalised log-weights [N]. All −inf raises (no particle survives)."""
    lse = torch.logsumexp(log_weights, dim=0)
    if not torch.isfinite(lse):
        raise FloatingPointError("every particle has zero weight (all log-weights are -inf or NaN); "
                                 "the reward or potential is degenerate")
    return log_weights - lse


def probabilities(log_weights: LogWeights) -> torch.Tensor:
    """Normalised weights w_i / Σ w in float64 [N] (sums to 1 up to float64 rounding)."""
    return torch.exp(normalize(log_weights.double()))


def ess(log_weights: LogWeights) -> float:
    """Effective sample size 1 / Σ w_i² of the normalised weights, in [1, N]."""
    lw = normalize(log_weights.double())
    return float(torch.exp(-torch.logsumexp(2.0 * lw, dim=0)))


def log_mean_exp(log_weights: LogWeights) -> float:
    """log( (1/N) Σ exp(log w_i) ): the log of the average weight (an SMC normaliser increment)."""
    return float(torch.logsumexp(log_weights.double(), dim=0) - math.log(log_weights.shape[0]))


def uniform(n: int, dtype: torch.dtype = torch.float64) -> LogWeights:
    """Equal normalised log-weights −log N, [n]."""
    return torch.full((n,), -math.log(n), dtype=dtype)
