"""② Where a run's particles are held: whole in this process, or split over several (``smc/distributed``).

The sampler's step is written for the whole population [N]; a :class:`Population` tells it how
this process's rows [n] relate to the whole. Per-particle values are gathered before any weight
formula, so the weights, the ESS and the resampling decision are the same numbers whatever the
split; the noise is drawn for the whole population and each process keeps its rows, so the run
is the same session in one process or in K.
"""

from __future__ import annotations

from typing import Protocol

import torch

from apa.types import Indices


class Population(Protocol):
    leads: bool  # whether this process reports progress (one of them does)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows in the whole population's order: [n, ...] -> [N, ...]."""

    def local(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a whole-population tensor: [N, ...] -> [n, ...]."""

    def take(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        """The rows this process holds after resampling: x [n, ...], ancestors [N] (the same everywhere)
        -> x_whole[ancestors][this process's slots] [n, ...]."""


class Whole:
    """The whole population in this process: n = N."""

    leads = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def local(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def take(self, x: torch.Tensor, ancestors: Indices) -> torch.Tensor:
        return x[ancestors]


WHOLE = Whole()
