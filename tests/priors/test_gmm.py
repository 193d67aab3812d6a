import math

import torch

from apa.priors.gmm import GaussianMixturePrior, make_gmm


def _log_density(prior, z, sigma):
    var = prior.stds**2 + sigma**2
    sq = ((z[:, None] - prior.means[None]) ** 2).sum(-1)
    d = z.shape[1]
    return torch.logsumexp(torch.log(prior.weights) - 0.5 * d * torch.log(2 * math.pi * var) - 0.5 * sq / var, 1)


def test_score_is_the_gradient_of_the_log_density():
    prior = make_gmm({})
    z = torch.randn(20, 2, generator=torch.Generator().manual_seed(0)) * 2
    for sigma in (0.05, 0.7, 3.0):
        zg = z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_log_density(prior, zg, sigma).sum(), zg)
        assert torch.allclose(prior.score(z, sigma), g, atol=1e-4, rtol=1e-4)
        assert torch.allclose(prior.tweedie(z, sigma), z + sigma**2 * g, atol=1e-4)


def test_initial_draws_have_the_noised_moments():
    prior = make_gmm({})
    n, sigma = 200_000, 1.3
    x = prior.sample_initial(n, sigma, torch.Generator().manual_seed(0)).double()
    mean, cov = GaussianMixturePrior.moments(prior.means, prior.stds, prior.weights)
    cov = cov + sigma**2 * torch.eye(2)
    se_mean = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - mean.double()).abs() < 5 * se_mean.double()).all()
    emp = torch.cov(x.T)
    assert torch.allclose(emp, cov.double(), atol=5 * float(cov.max()) * math.sqrt(2 / n))


def test_tilted_mixture_matches_importance_weighting():
    prior = make_gmm({})
    a, beta, n = torch.tensor([0.8, 0.5]), 2.0, 400_000
    x = prior.sample(n, torch.Generator().manual_seed(1)).double()
    w = torch.softmax(beta * x @ a.double(), 0)
    t = prior.tilted(a, beta)
    m, _ = GaussianMixturePrior.moments(t.means, t.stds, t.weights)
    ess = 1 / (w**2).sum()
    est = (w[:, None] * x).sum(0)
    assert ((est - m.double()).abs() < 6 * 2.0 / ess.sqrt()).all()


def test_sigma_grid():
    s = make_gmm({}).sigmas(25)
    assert s.shape == (26,) and s[-1] == 0 and (s[:-1] > s[1:]).all()
