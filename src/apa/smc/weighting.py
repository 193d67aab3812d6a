"""② The SMC weights of a run, one object per scheme, each computing its whole increment in one place.

A step of the sampler (``smc/sampler.py``) evaluates the potential at the particles z_i, asks its
weighting for the increment that completes their weights, resamples, and moves. The weighting sees:
  - ``pe``: the potential's pieces at z_i (ε, r, L_div, ∇(r + γ·L_div));
  - ``move``: the record of the move that brought the particles to z_i (None at the first step);
  - ``phi_end``: φ_N at the clean particles, after the last move.

``ExactWeights`` (the default): the discrete transition's weight (``fkc`` has the derivation)
  log w_0 = φ_0(z_0),   log w += φ_{i+1}(z_{i+1}) − φ_i(z_i) + log N(z_{i+1}; m_i, v_i) − log N(z_{i+1}; m_i + δ_i, v_i),
  the whole increment of move i computed once z_{i+1} is known, at the next step or at the end.
``RateWeights``: the seed's continuous-time rate over step i, read at z_i (left-point rule).
``NoWeights``: guidance without weights (biased; kept as the measured alternative).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from apa.smc import fkc
from apa.types import Particles


@dataclass(frozen=True)
class Move:
    """What the weights need of move i (z_i -> z_{i+1}), for this process's particles [n]."""

    phi: torch.Tensor  # φ_i(z_i) [n] float64 of the particles that moved (after resampling)
    noise: Particles  # ξ [n, *event]: z_{i+1} = m_i + δ_i + √v_i·ξ
    shift: Particles | None  # δ_i [n, *event]; None where the move was not shifted
    variance: float  # v_i per coordinate

    def log_ratio(self) -> torch.Tensor | float:
        """log N(z_{i+1}; m_i, v_i) − log N(z_{i+1}; m_i + δ_i, v_i): [n] float64 (0 without a shift)."""
        return 0.0 if self.shift is None else fkc.proposal_log_ratio(self.noise, self.shift, self.variance)


class Weighting(Protocol):
    weighs: bool  # whether the particles carry weights at all (and so may be resampled)

    def needs_gradient(self, deterministic: bool, drift: float) -> bool:
        """Whether step i needs ∇φ_i (for its shift or its increment)."""

    def shifts(self, deterministic: bool) -> bool:
        """Whether a move is shifted by the FKC drift (given the gradient)."""

    def increment(self, i: int, pe: fkc.PotentialEval, z: Particles, grad_phi: Particles | None,
                  move: Move | None, kernel) -> torch.Tensor | None:
        """The log-weight increment at the reweight of step i: [n] float64, or None for none
        (``kernel``: the run's fixed pieces, :class:`apa.smc.sampler.Kernel`)."""

    def final(self, move: Move, phi_end: torch.Tensor) -> torch.Tensor | None:
        """The increment after the last move, given φ_N at the clean particles: [n] float64 or None."""

    @property
    def needs_end(self) -> bool:
        """Whether :meth:`final` reads φ_N (so the run computes it)."""


class ExactWeights:
    """The discrete transition's weight: exact for p_disc·exp(φ_N) at any step count."""

    weighs, needs_end = True, True

    def needs_gradient(self, deterministic: bool, drift: float) -> bool:
        return not (deterministic or drift == 0.0)  # the gradient only shifts the move: none, none needed

    def shifts(self, deterministic: bool) -> bool:
        return not deterministic  # any shift is corrected by its proposal ratio; a deterministic step takes none

    def increment(self, i, pe, z, grad_phi, move, kernel):
        return self.completed(pe.potential(*kernel.sched.beta_gamma(i)), move)

    def final(self, move, phi_end):
        return self.completed(phi_end, move)

    @staticmethod
    def completed(phi_next: torch.Tensor, move: Move | None) -> torch.Tensor:
        """φ_{i+1}(z_{i+1}) − φ_i(z_i) + the proposal log-ratio of the move; φ_0(z_0) before any move."""
        if move is None:
            return phi_next
        return phi_next - move.phi + move.log_ratio()


class RateWeights:
    """The seed's rate ∂_sφ − ⟨∇φ, f⟩ + ⟨∇φ, (g²/2)·score⟩ over step i (exact only as steps -> ∞)."""

    weighs, needs_end = True, False

    def needs_gradient(self, deterministic: bool, drift: float) -> bool:
        return True

    def shifts(self, deterministic: bool) -> bool:
        return True

    def increment(self, i, pe, z, grad_phi, move, kernel):
        return fkc.rate_increment(kernel.cfg, pe, kernel.prior, z, i, kernel.sched, grad_phi)

    def final(self, move, phi_end):
        return None


class NoWeights(RateWeights):
    """Guidance alone: the shifted moves, equal weights, no resampling."""

    weighs = False

    def increment(self, i, pe, z, grad_phi, move, kernel):
        return None


def weighting_of(cfg) -> Weighting:
    """The weighting a sampler configuration names (none for a plain, unguided run)."""
    if not cfg.guided or cfg.weights == "none":
        return NoWeights()
    return ExactWeights() if cfg.weights == "exact" else RateWeights()
