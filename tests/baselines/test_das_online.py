"""DAS online: tempered SMC with reward-gradient proposals targets the prior tilted by exp(r/α), and
its UCB bonus rewards what the ratings have not covered.

The closed forms use the Gaussian-mixture prior (priors/gmm.py) with the linear reward r(z) = ⟨a, z⟩.
Statistical tolerances are z-scores against a Bonferroni-corrected Student-t quantile at a
family-wise level of 1e-3, the standard errors coming from independent seeds.
"""

import math

import pytest
import torch

from apa.baselines.common import to_targets
from apa.baselines.das_online import (DASOnlineConfig, das_sample, plain_reward, run, tempering, ucb_reward)
from apa.baselines.online import last_hidden, refit
from apa.priors.gmm import make_gmm
from apa.smc.sampler import sample_prior

from .conftest import A, SEEDS, assert_images, critical, mixture_shares



def test_tempering_is_the_codes_exponential_schedule_rescaled_to_25_steps():
    """λ_i = min(1, (1+γ)^i − 1) starts at 0, never decreases and ends at 1; with γ = 1.008⁴ − 1 at
    25 steps it equals the code's γ = 0.008 schedule at 100 steps at the same fraction of the
    trajectory (λ_i(25) = λ_4i(100)), reaching 1 at step 22 (the code: step 87)."""
    g = DASOnlineConfig().gamma
    lams = [tempering(i, g) for i in range(26)]
    assert lams[0] == 0.0 and lams[-1] == 1.0 and all(b >= a for a, b in zip(lams, lams[1:]))
    assert all(abs(tempering(i, g) - tempering(4 * i, 0.008)) < 1e-12 for i in range(26))
    assert min(i for i, v in enumerate(lams) if v == 1.0) == 22
    assert min(i for i in range(101) if tempering(i, 0.008) == 1.0) == 87


def test_das_targets_the_prior_tilted_by_exp_r_over_alpha():
    """DAS (guided proposals, tempered twists, ESS-triggered resampling) on one population of 1024
    particles targets p(z)·exp(r(z)/α), p the 25-step sampler's own law: its weighted component
    shares match plain samples reweighted by exp(r/α), over 12 seeds each, for α = 1 and 0.5.
    Detects a wrong proposal log-ratio, a twist not cancelled by the next step's (or cancelled by
    another particle's after resampling), a final λ ≠ 1: any bias above about 5 standard errors
    (0.01 to 0.03 on the shares)."""
    prior = make_gmm({})
    for alpha in (1.0, 0.5):
        target = prior.tilted(A, 1.0 / alpha)
        cfg = DASOnlineConfig(particles=1024, alpha=alpha)
        est = torch.stack([mixture_shares(target, res.particles, res.log_weights) for res in
                           (das_sample(prior, lambda z: z @ A, 1, cfg, torch.Generator().manual_seed(s))
                            for s in range(SEEDS))])
        ref = torch.stack([mixture_shares(target, z, (z @ A) / alpha) for z in
                           (sample_prior(prior, 8192, cfg.steps, torch.Generator().manual_seed(100 + s),
                                         batch_size=8192, decode=False) for s in range(SEEDS))])
        se = (est.var(0) / SEEDS + ref.var(0) / SEEDS).sqrt()
        z = (est.mean(0) - ref.mean(0)) / se
        assert z.abs().max() < critical(len(z), SEEDS - 1), (alpha, est.mean(0), ref.mean(0), z)


@pytest.mark.parametrize("jacobian", ["exact", "gaussian"])
def test_the_proposal_moves_particles_up_the_reward(jacobian):
    """Without its weights, DAS's guided proposal alone already raises the mean reward above the
    plain sampler's, by more than 5 standard errors over 2048 particles each (α = 0.1: the shift
    v·λ·a/α is large; measured: about 20 standard errors), with either Jacobian of ẑ0. Detects a
    guidance of the wrong sign, or none."""
    prior, n = make_gmm({}), 2048
    cfg = DASOnlineConfig(particles=n, alpha=0.1, ess_threshold=0.0, jacobian=jacobian)  # the proposal alone
    guided = das_sample(prior, lambda z: z @ A, 1, cfg, torch.Generator().manual_seed(0)).particles @ A
    plain = sample_prior(prior, n, cfg.steps, torch.Generator().manual_seed(1), batch_size=n, decode=False) @ A
    se = math.sqrt(guided.var() / n + plain.var() / n)
    assert float(guided.mean() - plain.mean()) > 5 * se


def test_ess_is_at_least_its_threshold_after_every_resampling_check():
    """With 4 particles per population and a strong tilt (α = 0.05), the ESS of some populations
    falls below 0.5·N at many steps; after every check each population's ESS is back at or above
    0.5·N (resampled to N, or never below). Detects a resampling decision on the wrong weights or
    weights not reset after resampling."""
    cfg = DASOnlineConfig(alpha=0.05)
    res = das_sample(make_gmm({}), lambda z: z @ A, 64, cfg, torch.Generator().manual_seed(0))
    assert res.resampled > 0 and min(res.ess) < 0.5 * cfg.particles
    assert min(res.ess_after) >= 0.5 * cfg.particles - 1e-9
    assert res.log_weights.shape == (64, 4) and torch.isfinite(res.log_weights).all()


def test_ucb_bonus_is_small_at_rated_images_and_large_away_from_them(tiny_prior, user):
    """With Σ = nλ·I + Σ_i φ_iφ_iᵀ over the n rated images, a rated image's leverage φᵀΣ⁻¹φ is below 1,
    so its bonus is below c·√n; an image whose features leave the span of the rated ones has a bonus
    of about c·√n·|φ_⊥|/√(nλ): bright images, away from the dark rated ones, get more than twice
    the bound. The UCB reward is the network plus that bonus, clipped. Detects a bonus that grows
    near the data, ignores the covariance or is not scaled as the code's."""
    gen = torch.Generator().manual_seed(0)
    rated = torch.rand(6, 1, 28, 28, generator=gen) * 0.5 - 1.0  # dark images, particles in [-1, -0.5]
    away = 1.0 - torch.rand(6, 1, 28, 28, generator=gen) * 0.5  # bright images
    model = refit(tiny_prior, rated, to_targets(user(rated * 0.5 + 0.5), user), 0, 0)
    cfg = DASOnlineConfig()
    ucb, raw = ucb_reward(tiny_prior, model, rated, cfg), plain_reward(tiny_prior, model)
    with torch.no_grad():
        bonus_rated, bonus_away = ucb(rated) - raw(rated), ucb(away) - raw(away)
    bound = cfg.ucb_c * math.sqrt(6)
    assert (bonus_rated >= 0).all() and (bonus_rated < bound).all(), bonus_rated
    assert (bonus_away > 2 * bound).all(), bonus_away  # measured: 2.4 to 8 times c·√n
    clipped = ucb_reward(tiny_prior, model, rated, DASOnlineConfig(ucb_clip=0.01))
    with torch.no_grad():
        assert torch.allclose(clipped(away) - raw(away), torch.full((6,), 0.01), atol=1e-5)
    assert last_hidden(model, rated).shape[0] == 6


def test_online_run_spends_the_budget_and_returns_images(tiny_prior, user):
    """The online loop on the tiny prior: exactly the budget rated, one record per round, later
    rounds drawn by DAS (their sampling logged), checkpoint and final images of the right shape."""
    cfg = DASOnlineConfig(steps=3, particles=2)
    res = run(tiny_prior, user, 5, 2, 0, config=cfg, checkpoints=(2, 5), eval_samples=3)
    assert [r.spent for r in res.records] == [2, 4, 5] and res.oracle_ratings == 5
    assert [len(r.scores) for r in res.records] == [2, 2, 1]
    assert res.info["round_sampling"][0] == [] and len(res.info["round_sampling"][2]) == 1
    for r in res.records:
        assert_images(r.images, len(r.scores))
    assert sorted(res.checkpoints) == [2, 5]
    assert_images(res.checkpoints[2], 3)
    assert_images(res.sample(4, torch.Generator().manual_seed(1)), 4)
