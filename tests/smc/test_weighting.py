"""The weightings: which one a configuration names, and the exact increment's bookkeeping.

The sampler-level tests (test_sampler.py: the closed-form tilted mixture, the path formula, the
reuse of r(ẑ0)) check the increments inside a run; these check the pieces on their own: a wrong
sign or a dropped proposal ratio in ``ExactWeights.completed`` fails here."""

import torch

from apa.config import SamplerConfig
from apa.smc import fkc
from apa.smc.weighting import ExactWeights, Move, NoWeights, RateWeights, weighting_of


def test_each_configuration_names_its_weighting():
    assert isinstance(weighting_of(SamplerConfig()), ExactWeights)
    assert isinstance(weighting_of(SamplerConfig(weights="rate")), RateWeights)
    assert isinstance(weighting_of(SamplerConfig(weights="none")), NoWeights)
    assert isinstance(weighting_of(SamplerConfig(beta=(0.0, 0.0))), NoWeights)  # a plain run carries no weights
    assert not NoWeights().weighs and ExactWeights().weighs and RateWeights().weighs


def test_exact_increments_telescope_to_the_last_potential_plus_the_proposal_ratios():
    """Over a path z_0 .. z_3, the increments sum to φ_3(z_3) + Σ_i log-ratio_i: every φ_i in between
    cancels, so it is added once and taken away once."""
    g = torch.Generator().manual_seed(0)
    phis = [torch.randn(5, dtype=torch.float64, generator=g) for _ in range(4)]
    moves = [Move(phis[i], torch.randn(5, 2, generator=g), torch.randn(5, 2, generator=g) * 0.1, 0.3)
             for i in range(3)]
    total = ExactWeights.completed(phis[0], None)
    for i in range(3):
        total = total + ExactWeights.completed(phis[i + 1], moves[i])
    ratios = sum(fkc.proposal_log_ratio(m.noise, m.shift, m.variance) for m in moves)
    assert torch.allclose(total, phis[3] + ratios)
    unshifted = Move(phis[0], torch.zeros(5, 2), None, 0.0)
    assert torch.equal(ExactWeights.completed(phis[1], unshifted), phis[1] - phis[0])  # no shift, no ratio


def test_exact_weights_shift_only_stochastic_steps_and_need_no_gradient_without_a_shift():
    w = ExactWeights()
    assert w.shifts(deterministic=False) and not w.shifts(deterministic=True)
    assert not w.needs_gradient(deterministic=True, drift=1.0) and not w.needs_gradient(False, 0.0)
    assert w.needs_gradient(False, 1.0) and RateWeights().needs_gradient(True, 0.0)
