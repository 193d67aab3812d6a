"""The arbiter: FKC-SMC on a Gaussian mixture with a linear reward reproduces the closed-form
tilted mixture p_0·exp(β_end·⟨a, z⟩) within Monte Carlo error, and unweighted guidance does not.

Tolerances come from the statistics: S independent seeds give S estimates of each statistic;
their mean is compared with the truth in units of its standard error (seed-to-seed spread / √S)
against Student's t quantile for S−1 degrees of freedom at a family-wise level of 1e-4
(Bonferroni over the statistics). The discretisation bias at 1000 steps is below that error
(benchmarks/exactness.py measures it)."""

import math

import pytest
import torch
from scipy import stats

from apa import GaussianMixturePrior, fkc_sample
from apa.priors.gmm import make_gmm
from apa.smc import sampler

A = torch.tensor([0.8, 0.5])
SEEDS, N, STEPS = 8, 1024, 1000


def _statistics(prior_t: GaussianMixturePrior, particles: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Weighted component probabilities [K], mean [2], covariance (xx, xy, yy) [3]."""
    w = torch.exp(log_w.double())
    x = particles.double()
    comp = (w[:, None] * prior_t.responsibilities(particles, 0.0).double()).sum(0)
    m = (w[:, None] * x).sum(0)
    c = (w[:, None, None] * (x - m)[:, :, None] * (x - m)[:, None, :]).sum(0).flatten()[[0, 1, 3]]
    return torch.cat([comp, m, c])


def _truth(prior_t: GaussianMixturePrior) -> torch.Tensor:
    m, c = GaussianMixturePrior.moments(prior_t.means, prior_t.stds, prior_t.weights)
    return torch.cat([prior_t.weights, m, c.flatten()[[0, 1, 3]]]).double()


def _z_scores(use_weights: bool) -> torch.Tensor:
    prior = make_gmm({})
    target = prior.tilted(A, 2.0)
    est = []
    for seed in range(SEEDS):
        res = fkc_sample(prior, lambda z: z @ A, num_particles=N, num_steps=STEPS, beta=(0.5, 2.0),
                         generator=torch.Generator().manual_seed(seed), use_weights=use_weights)
        est.append(_statistics(target, res.particles, res.log_weights))
    e = torch.stack(est)
    se = e.std(0) / math.sqrt(SEEDS)
    keep = se > 0  # the negligible first component can have zero spread in both
    return ((e.mean(0) - _truth(target)) / se)[keep]


def _critical(num_stats: int) -> float:
    return float(stats.t.ppf(1 - 1e-4 / (2 * num_stats), df=SEEDS - 1))


@pytest.fixture(scope="module")
def threads():
    torch.set_num_threads(1)


def test_fkc_matches_closed_form_tilted_mixture():
    z = _z_scores(use_weights=True)
    assert z.abs().max() < _critical(len(z)), z


def test_unweighted_guidance_is_measurably_biased():
    z = _z_scores(use_weights=False)
    assert z.abs().max() > _critical(len(z)), z


def test_beta_zero_is_the_plain_ancestral_sampler():
    prior = make_gmm({})
    noise = torch.randn(10, 64, 2, generator=torch.Generator().manual_seed(3))
    init = prior.sample_initial(64, float(prior.sigmas(10)[0]), torch.Generator().manual_seed(4))
    res = fkc_sample(prior, lambda z: z.sum(1), num_particles=64, num_steps=10, beta=(0.0, 0.0),
                     initial=init, noise_fn=lambda i, shape, g: noise[i])
    z, sig = init, prior.sigmas(10)
    for i in range(10):
        z = prior.transition(z, prior.eps(z, float(sig[i])), float(sig[i]), float(sig[i + 1]), noise[i])
    assert torch.allclose(res.particles, z, atol=1e-6)
    assert torch.allclose(res.log_weights, torch.full((64,), -math.log(64), dtype=torch.float64))


def test_reproducible_from_seed():
    prior = make_gmm({})
    runs = [fkc_sample(prior, lambda z: z @ A, num_particles=32, num_steps=20,
                       generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].particles, runs[1].particles)
    assert torch.equal(runs[0].log_weights, runs[1].log_weights)


def test_weights_carried_forward_without_resampling():
    """With resampling off, the final log-weights are the start plus every increment (none lost)."""
    prior = make_gmm({})
    g = torch.Generator().manual_seed(0)
    cfg = sampler.FKCConfig(num_steps=5, resample="none")
    sig = prior.sigmas(5)
    state = sampler.init_state(prior, 16, sig, g)
    total = torch.zeros(16, dtype=torch.float64)
    for i in range(5):
        new, info = sampler.step(state, prior, lambda z: z @ A, cfg, sig, generator=g)
        assert not info.resampled
        # the increment of this step is the change in unnormalised log-weight
        total += new.log_weights - state.log_weights
        state = new
    # normalised log-weights differ from the accumulated increments only by a constant
    diff = state.log_weights - total
    assert torch.allclose(diff, diff[0].expand(16), atol=1e-9)
    assert state.log_weights.exp().sum() == pytest.approx(1.0)
    assert state.log_weights.std() > 0.1  # weights really were carried, not reset


def test_resampling_resets_weights_and_records_trace():
    prior = make_gmm({})
    res = fkc_sample(prior, lambda z: 5 * z @ A, num_particles=64, num_steps=20, ess_threshold=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert len(res.trace) == 20
    assert any(s.resampled for s in res.trace)
    assert all(1.0 <= s.ess <= 64 + 1e-9 for s in res.trace)
    assert res.origins is not None and res.trace[-1].unique_origins == int(res.origins.unique().numel())


def test_nan_reward_raises_naming_the_step():
    prior = make_gmm({})

    def reward(z):
        r = z @ A
        return torch.where(z[:, 0] > 1e9, r, r * float("nan")) if reward.calls > 2 else (reward.__setattr__("calls", reward.calls + 1) or r)

    reward.calls = 0
    with pytest.raises(FloatingPointError, match=r"step 3: the reward is not finite"):
        fkc_sample(prior, reward, num_particles=8, num_steps=10, generator=torch.Generator().manual_seed(0))


def test_seed_compatibility_clamp_without_resampling():
    prior = make_gmm({})
    res = fkc_sample(prior, lambda z: 50 * z @ A, num_particles=32, num_steps=10, resample="none", clamp=100.0,
                     generator=torch.Generator().manual_seed(0))
    assert not any(s.resampled for s in res.trace)
    assert res.log_weights.exp().sum().item() == pytest.approx(1.0)


def test_bad_configuration_is_refused():
    prior = make_gmm({})
    with pytest.raises(ValueError, match="reward_at"):
        fkc_sample(prior, lambda z: z[:, 0], num_particles=4, num_steps=2, reward_at="x0")
    with pytest.raises(ValueError, match="ess_threshold"):
        fkc_sample(prior, lambda z: z[:, 0], num_particles=4, num_steps=2, ess_threshold=2.0)
    with pytest.raises(ValueError, match="resampling scheme"):
        fkc_sample(prior, lambda z: z[:, 0], num_particles=4, num_steps=2, resample="bogus")
    with pytest.warns(UserWarning, match="literal"):
        sampler.FKCConfig(reward_at="tweedie", jacobian="identity")
