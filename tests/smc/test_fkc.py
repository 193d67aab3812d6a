import pytest
import torch

from apa.priors.gmm import GaussianMixturePrior
from apa.smc import fkc


def _one_gaussian():
    return GaussianMixturePrior([[0.5, -1.0]], [0.8], [1.0], sigma_max=5.0)


def _grad(prior, reward, z, sigma, reward_at, jacobian):
    return fkc.evaluate_potential(prior, reward, z, sigma, 0.0, reward_at=reward_at, jacobian=jacobian,
                                  use_diversity=False, historical=None, step=0).grad


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


def test_increment_arithmetic():
    grad = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    score = torch.tensor([[0.5, 0.5], [2.0, 3.0]])
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    dphi = torch.tensor([0.1, 0.2])
    inc = fkc.log_weight_increment(dphi, grad, score, f, g2_ds=0.4)
    # dphi − ⟨∇φ, f⟩ + (g²ds/2)⟨∇φ, score⟩
    expected = torch.tensor([0.1 - 1.0 + 0.2 * 1.5, 0.2 + 1.0 + 0.2 * -3.0], dtype=torch.float64)
    assert torch.allclose(inc, expected)
    assert torch.allclose(fkc.drift_shift(grad, 0.4), 0.2 * grad)


def test_linear_schedule():
    s = fkc.linear_schedule(0.5, 2.0, 3)
    assert s.tolist() == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_nan_gradient_is_refused():
    prior = _one_gaussian()
    reward = lambda u: torch.sqrt(u[:, 0] - 100.0).nan_to_num(0.0)  # noqa: E731  finite value, NaN gradient
    with pytest.raises(FloatingPointError, match="step 0: the reward gradient"):
        _grad(prior, reward, torch.zeros(3, 2), 1.0, "xt", "exact")
