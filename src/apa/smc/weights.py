"""Log-space importance weights: normalisation, ESS, log-mean-exp. The only place these live."""

from __future__ import annotations

import math

import torch

from apa.types import LogWeights


def reads_freely(t: torch.Tensor) -> bool:
    """Whether reading a value of ``t`` back costs nothing: it already lives on the host (the CPU).
    Checks that read values back are made there at once; on a GPU they wait for the end of the run."""
    return t.device.type == "cpu"


def normalize(log_weights: LogWeights, check: bool | None = None) -> LogWeights:
    """log w_i − logsumexp(log w): normalised log-weights [N]. All −inf raises (no particle survives).

    ``check`` None: check where the weights live on the host; on a GPU the check would be a device
    sync, and the sampler checks its increments once per run instead (``fkc.Deferred``).
    """
    lse = torch.logsumexp(log_weights, dim=0)
    if (reads_freely(log_weights) if check is None else check) and not torch.isfinite(lse):
        raise FloatingPointError("every particle has zero weight (all log-weights are -inf or NaN); "
                                 "the reward or potential is degenerate")
    return log_weights - lse


def probabilities(log_weights: LogWeights) -> torch.Tensor:
    """Normalised weights w_i / Σ w in float64 [N] (sums to 1 up to float64 rounding)."""
    return torch.exp(normalize(log_weights.double()))


def ess_tensor(log_weights: LogWeights, check: bool | None = None) -> torch.Tensor:
    """Effective sample size 1 / Σ w_i² as a float64 0-dim tensor on the weights' device
    (no host read unless ``check`` reads the normaliser back, see :func:`normalize`)."""
    lw = normalize(log_weights.double(), check)
    return torch.exp(-torch.logsumexp(2.0 * lw, dim=0))


def ess(log_weights: LogWeights) -> float:
    """Effective sample size 1 / Σ w_i² of the normalised weights, in [1, N]."""
    return float(ess_tensor(log_weights))


def log_mean_exp(log_weights: LogWeights) -> float:
    """log( (1/N) Σ exp(log w_i) ): the log of the average weight (an SMC normaliser increment)."""
    return float(torch.logsumexp(log_weights.double(), dim=0) - math.log(log_weights.shape[0]))


def uniform(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> LogWeights:
    """Equal normalised log-weights −log N, [n] (on ``device``, the CPU by default)."""
    return torch.full((n,), -math.log(n), dtype=dtype, device=device)
