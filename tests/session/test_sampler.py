"""RoundSampler alone, on the Gaussian mixture (no store, no session): before any feedback a round is
the prior's own sampler bit for bit, and explored particles join the shown images with no weight."""

import torch

from apa.config import SamplerConfig
from apa.priors.gmm import make_gmm
from apa.session.sampler import RoundSampler, choose_shown, with_explored
from apa.smc.sampler import fkc_sample, zero_reward

CFG = SamplerConfig(particles=16, steps=6, beta=(1.0, 4.0), reward_at="xt")


def test_before_feedback_a_round_is_the_plain_sampler():
    prior = make_gmm({})
    res = RoundSampler(prior, CFG, progress=False).sample(zero_reward, None, 8, torch.Generator().manual_seed(4))
    plain = fkc_sample(prior, zero_reward, SamplerConfig(particles=8, steps=6, beta=(0.0, 0.0), reward_at="xt"),
                       generator=torch.Generator().manual_seed(4))
    assert torch.equal(res.particles, plain.particles) and torch.equal(res.log_weights, plain.log_weights)


def test_explored_particles_are_shown_after_the_chosen_ones_with_no_weight():
    prior = make_gmm({})
    sampler = RoundSampler(prior, CFG, progress=False)
    res = sampler.sample(zero_reward, None, 16, torch.Generator().manual_seed(0))
    both = with_explored(res, sampler.plain(3, torch.Generator().manual_seed(1)))
    assert both.particles.shape == (19, 2) and torch.isinf(both.log_weights[16:]).all()
    drawn = both.resample(64, torch.Generator().manual_seed(2))  # the weighted population alone
    assert (torch.cdist(drawn, both.particles[16:]).min(1).values > 0).all()
    shown = choose_shown("diverse", both, 16, 5, 3, None, torch.device("cpu"), 0, 0)
    assert shown.shape == (8,) and shown[5:].tolist() == [16, 17, 18] and (shown[:5] < 16).all()


def test_a_rounds_own_beta_end_is_the_plain_sampler_run_at_that_beta():
    """``beta_end`` changes the tilt's end and nothing else: the round equals fkc_sample at (β_start, beta_end),
    bit for bit, and differs from the run at the sampler's own β."""
    prior = make_gmm({})

    def reward(z):
        return -z.pow(2).sum(1)

    sampler = RoundSampler(prior, CFG, progress=False)
    res = sampler.sample(reward, object(), 16, torch.Generator().manual_seed(5), beta_end=8.0)
    sharp = fkc_sample(prior, reward, SamplerConfig(particles=16, steps=6, beta=(1.0, 8.0), reward_at="xt"),
                       generator=torch.Generator().manual_seed(5))
    own = sampler.sample(reward, object(), 16, torch.Generator().manual_seed(5))
    assert torch.equal(res.particles, sharp.particles) and torch.equal(res.log_weights, sharp.log_weights)
    assert not torch.equal(res.log_weights, own.log_weights)
