import math

import pytest
import torch

from apa.config import SamplerConfig
from apa.priors.gmm import GaussianMixturePrior
from apa.smc import fkc


def _one_gaussian():
    return GaussianMixturePrior([[0.5, -1.0]], [0.8], [1.0], sigma_max=5.0)


def _grad(prior, reward, z, sigma, reward_at, jacobian):
    cfg = SamplerConfig(reward_at=reward_at, jacobian=jacobian)
    return fkc.evaluate_potential(prior, reward, z, sigma, 0.0, cfg, historical=None, step=0).grad


def test_gaussian_jacobian_is_exact_for_gaussian_data():
    """For one Gaussian component ẑ0 is affine in z with Jacobian s²/(s²+σ²): both chain rules agree."""
    prior = _one_gaussian()
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(0)) * 3
    reward = lambda u: torch.sin(u[:, 0]) + u[:, 1] ** 2  # noqa: E731
    for sigma in (0.1, 1.0, 4.0):
        exact = _grad(prior, reward, z, sigma, "tweedie", "exact")
        gauss = _grad(prior, reward, z, sigma, "tweedie", "gaussian")
        literal = _grad(prior, reward, z, sigma, "tweedie", "identity")
        assert torch.allclose(exact, gauss, atol=1e-5, rtol=1e-4)
        scale = 0.8**2 / (0.8**2 + sigma**2)
        assert torch.allclose(literal * scale, exact, atol=1e-5, rtol=1e-4)


def test_exact_jacobian_matches_finite_differences_on_a_mixture():
    prior = GaussianMixturePrior([[-2.0, 0.0], [2.0, 0.0]], [0.5, 0.7], [0.5, 0.5])
    reward = lambda u: (u**2).sum(1)  # noqa: E731
    z = torch.tensor([[0.3, 0.2], [-1.0, 0.5]], dtype=torch.float32)
    sigma = 1.5
    grad = _grad(prior, reward, z, sigma, "tweedie", "exact")
    h = 1e-3
    for k in range(2):
        dz = torch.zeros_like(z)
        dz[:, k] = h
        f = lambda x: reward(prior.tweedie(x, sigma))  # noqa: E731
        fd = (f(z + dz) - f(z - dz)) / (2 * h)
        assert torch.allclose(grad[:, k], fd, atol=2e-2, rtol=2e-2)


def test_reward_at_xt_gradient_of_linear_reward():
    prior = _one_gaussian()
    a = torch.tensor([0.3, -0.7])
    z = torch.randn(5, 2)
    g = _grad(prior, lambda u: u @ a, z, 2.0, "xt", "exact")
    assert torch.allclose(g, a.expand(5, 2))


def test_rate_increment_arithmetic():
    """The seed's rate: (β_{i+1}−β_i)·r − ⟨∇φ, f⟩ + (g²ds/2)⟨∇φ, score⟩, plus φ_0 at i = 0 (VE form: f = 0)."""
    prior = _one_gaussian()
    cfg = SamplerConfig(steps=2, beta=(1.0, 3.0), gamma=(0.0, 0.0), weights="rate", beta_schedule="linear")
    sched = fkc.Schedule.of(prior, cfg)
    z = torch.tensor([[0.3, -0.2], [1.0, 2.0]])
    sig, sig_next, b0, _ = sched.at(1)
    eps = prior.eps(z, sig)
    reward = torch.tensor([0.5, -1.0])
    pe = fkc.PotentialEval(eps, reward, torch.zeros(2), None)
    grad_phi = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    inc = fkc.rate_increment(cfg, pe, prior, z, 1, sched, grad_phi)
    score = -eps / sig
    expected = (3.0 - 2.0) * reward + 0.5 * (sig**2 - sig_next**2) * (grad_phi * score).sum(1)
    assert torch.allclose(inc, expected.double(), atol=1e-6)
    inc0 = fkc.rate_increment(cfg, pe, prior, z, 0, sched, grad_phi)
    sig0, sig1, _, _ = sched.at(0)
    score0 = -eps / sig0
    expected0 = (2.0 - 1.0) * reward + 0.5 * (sig0**2 - sig1**2) * (grad_phi * score0).sum(1) + 1.0 * reward
    assert torch.allclose(inc0, expected0.double(), atol=1e-5)


def test_proposal_log_ratio_is_the_gaussian_density_ratio():
    """−⟨ξ, δ⟩/√v − ‖δ‖²/(2v) equals log N(z'; m, v) − log N(z'; m + δ, v) at z' = m + δ + √v·ξ."""
    g = torch.Generator().manual_seed(0)
    m, d, xi = torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g), torch.randn(6, 3, generator=g)
    v = 0.37
    z = m + d + math.sqrt(v) * xi
    normal = lambda mean: torch.distributions.Normal(mean.double(), math.sqrt(v)).log_prob(z.double()).sum(1)  # noqa: E731
    assert torch.allclose(fkc.proposal_log_ratio(xi, d, v), normal(m) - normal(m + d), atol=1e-9)
    assert torch.allclose(fkc.drift_shift(d, 0.4), 0.2 * d)


def test_linear_schedule():
    s = fkc.linear_schedule(0.5, 2.0, 3)
    assert s.tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_nan_gradient_is_refused():
    prior = _one_gaussian()
    reward = lambda u: torch.sqrt(u[:, 0] - 100.0).nan_to_num(0.0)  # noqa: E731  finite value, NaN gradient
    with pytest.raises(FloatingPointError, match="step 0: the reward gradient"):
        _grad(prior, reward, torch.zeros(3, 2), 1.0, "xt", "exact")
