"""FK steering: its potentials tilt the prior's own sampler toward the reward, as the paper says.

The closed forms use the Gaussian-mixture prior (priors/gmm.py) with the linear reward r(z) = ⟨a, z⟩.
Every statistical tolerance is a z-score against a Bonferroni-corrected Student-t quantile at a
family-wise level of 1e-3, the standard errors coming from independent seeds (so they include the
binomial error of each seed's shares and the resampling noise).
"""

import math

import pytest
import torch

from apa.baselines.fk_steering import FKState, FKSteeringConfig, fk_steer, fk_step, potential, run
from apa.baselines.online import pick_per_population, population_ess, resample_populations
from apa.priors.gmm import make_gmm
from apa.smc.sampler import sample_prior

from .conftest import A, SEEDS, assert_images, critical, mixture_shares



def tilted_reference(prior, target, lam: float, steps: int, n: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """The discrete sampler's law tilted by exp(λ·r): plain ancestral samples over ``steps`` steps,
    self-normalised by exp(λ·⟨a, z⟩). Component shares under ``target`` (mean [K], standard error [K])."""
    est = [mixture_shares(target, z, lam * (z @ A)) for z in
           (sample_prior(prior, n, steps, torch.Generator().manual_seed(100 + s), batch_size=n, decode=False)
            for s in range(SEEDS))]
    e = torch.stack(est)
    return e.mean(0), e.std(0) / math.sqrt(SEEDS)


def test_the_resampling_grid_is_the_papers_scaled_to_25_steps():
    """Every 20 of 100 steps from 20 to 80, and the last, becomes every 5 of 25 from 5 to 20, and 24."""
    assert FKSteeringConfig().potential_steps() == {5, 10, 15, 20, 24}
    assert FKSteeringConfig(steps=3).potential_steps() == {2}


def test_potentials_are_the_papers():
    """difference: λ(r − r_prev); max: λ·max(r, M_prev); sum: λ(r + S_prev); max/sum end with
    λ·r − Σ log G so far. Detects a wrong formula or a missing final correction."""
    state = FKState(torch.zeros(2, 1), torch.zeros(1, 2), torch.tensor([[0.5, 2.0]]), torch.tensor([[3.0, 7.0]]), 0)
    r = torch.tensor([[1.0, 1.0]])
    g, s = potential("difference", 2.0, r, state, final=False)
    assert g.tolist() == [[1.0, -2.0]] and s.tolist() == [[1.0, 1.0]]
    g, s = potential("max", 2.0, r, state, final=False)
    assert g.tolist() == [[2.0, 4.0]] and s.tolist() == [[1.0, 2.0]]
    g, s = potential("sum", 2.0, r, state, final=False)
    assert g.tolist() == [[3.0, 6.0]] and s.tolist() == [[1.5, 3.0]]
    g, _ = potential("max", 2.0, r, state, final=True)
    assert g.tolist() == [[-1.0, -5.0]]


@pytest.mark.parametrize("kind", ["difference", "max", "sum"])
def test_without_resampling_every_potential_ends_at_exp_lambda_r(kind):
    """With resampling off (adaptive, threshold 0) the weights carried over all steps are
    exp(λ·r(z_0)) up to normalisation, whatever the potential: the product of the potentials
    telescopes. Detects a lost or double-counted increment, a weight reset or a wrong correction."""
    cfg = FKSteeringConfig(steps=10, particles=64, lam=1.5, potential=kind, resample_every=2, resample_start=1,
                           resample_end=8, adaptive=True, ess_threshold=0.0)
    res = fk_steer(make_gmm({}), lambda z: z @ A, 2, cfg, torch.Generator().manual_seed(0))
    expected = 1.5 * res.rewards - torch.logsumexp(1.5 * res.rewards, dim=1, keepdim=True)
    assert res.resampled == 0
    assert torch.allclose(res.rewards.flatten(), (res.particles @ A).double(), atol=1e-5)  # r read at z_0 last
    assert torch.allclose(res.log_weights, expected, atol=1e-9)


def test_difference_potential_targets_the_tilted_prior():
    """FK steering with the difference potential, resampling at the paper's (scaled) grid, targets
    p(z)·exp(λ·r(z)) for the law p of the 25-step sampler itself: the weighted component shares of
    one population of 1024 particles match the plain sampler's samples reweighted by exp(λ·r), over
    12 seeds each. The reference is within 0.03 of the closed-form tilted mixture (the rest is the
    25-step discretisation). Detects a potential that does not telescope to exp(λ·r) (the sum
    potential misses by 0.27 here), resampling by the wrong weights, or weights lost at resampling:
    any bias above about 5 standard errors (0.015 to 0.035 on the shares)."""
    prior, lam, steps = make_gmm({}), 1.0, 25
    target = prior.tilted(A, lam)
    cfg = FKSteeringConfig(steps=steps, particles=1024, lam=lam, potential="difference")
    est = torch.stack([mixture_shares(target, res.particles, res.log_weights) for res in
                       (fk_steer(prior, lambda z: z @ A, 1, cfg, torch.Generator().manual_seed(s))
                        for s in range(SEEDS))])
    ref, ref_se = tilted_reference(prior, target, lam, steps)
    assert (ref - target.weights.double()).abs().max() < 0.03
    z = (est.mean(0) - ref) / (est.var(0) / SEEDS + ref_se**2).sqrt()
    assert z.abs().max() < critical(len(z), SEEDS - 1), (est.mean(0), ref, z)


def test_max_potential_puts_more_mass_on_high_reward_than_the_prior():
    """The paper's setting (k = 4, λ = 10, max potential, best particle of each population): over
    400 populations the share of the highest-reward component (m = (2, 0), prior weight 0.3) rises
    above the prior's and the low-reward component's (m = (−2, 0), prior weight 0.5) falls below
    its, each by more than 5 binomial standard errors. Detects steering with the wrong sign or none."""
    prior = make_gmm({})
    cfg = FKSteeringConfig()
    res = fk_steer(prior, lambda z: z @ A, 400, cfg, torch.Generator().manual_seed(0))
    out = res.particles[pick_per_population(res.rewards, res.log_weights, "best", None)]
    comp = prior.responsibilities(out, 0.0).argmax(1)
    share_high, share_low = float((comp == 1).double().mean()), float((comp == 0).double().mean())
    assert share_high > 0.3 + 5 * math.sqrt(0.3 * 0.7 / 400), share_high
    assert share_low < 0.5 - 5 * math.sqrt(0.5 * 0.5 / 400), share_low
    assert min(res.ess) >= 1.0 and res.resampled == 4 * 400  # four intermediate steps, always resampled


def test_resampled_copies_move_from_their_ancestor():
    """A reward so steep that one particle takes all the weight at a potential step: after the
    resampling every particle is a copy of it and moves by the prior's kernel from it, so
    (z_next − m)/√v (m, v: that ancestor's kernel mean and variance) is standard normal noise; its
    variance is 1 within 5 standard errors. Detects particles moved with another particle's ε."""
    prior, cfg = make_gmm({}), FKSteeringConfig(particles=512, lam=1.0, potential="difference")
    sigmas = prior.sigmas(cfg.steps)
    s, s_next = float(sigmas[5]), float(sigmas[6])
    gen = torch.Generator().manual_seed(0)
    z = prior.sample_initial(512, s, gen)
    state = FKState(z, torch.full((1, 512), -math.log(512), dtype=torch.float64),
                    torch.zeros(1, 512, dtype=torch.float64), torch.zeros(1, 512, dtype=torch.float64), 5)
    reward = lambda x: 1e4 * (x @ A)  # noqa: E731
    new, info = fk_step(state, prior, reward, cfg, sigmas, gen)
    k = int(reward(prior.tweedie(z, s)).argmax())
    mean = prior.transition(z[k:k + 1], prior.eps(z[k:k + 1], s), s, s_next, torch.zeros(1, 2))
    xi = (new.particles - mean) / prior.transition_variance(s, s_next) ** 0.5
    assert info["resampled"] == 1
    assert abs(float(xi.var()) - 1.0) < 5 * math.sqrt(2 / xi.numel()), float(xi.var())


def test_resample_populations_stays_within_each_population_and_carries_the_rest():
    """Ancestors of a resampled population come from it alone; an unchosen population keeps its
    normalised weights and its own particles."""
    lw = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25], [0.0, 0.0, 1.0, 0.0]]))
    idx, out = resample_populations(lw, torch.tensor([True, False, True]), "systematic",
                                    torch.Generator().manual_seed(0))
    idx = idx.view(3, 4)
    assert ((idx[0] >= 0) & (idx[0] < 4)).all() and idx[1].tolist() == [4, 5, 6, 7] and idx[2].tolist() == [10] * 4
    assert torch.allclose(out[[0, 2]], torch.full((2, 4), -math.log(4), dtype=torch.float64))
    assert torch.allclose(out[1], lw[1].double())
    assert torch.allclose(population_ess(out), torch.tensor([4.0, 4.0, 4.0], dtype=torch.float64))


def test_online_run_spends_the_budget_and_returns_images(tiny_prior, user):
    """The online loop on the tiny prior: exactly the budget rated, one record per round, round 0
    plain and later rounds steered (their sampling logged), checkpoint and final images in range."""
    cfg = FKSteeringConfig(steps=3, particles=2, resample_start=1, resample_end=1)
    res = run(tiny_prior, user, 5, 2, 0, config=cfg, checkpoints=(2, 5), eval_samples=3)
    assert [r.spent for r in res.records] == [2, 4, 5] and res.oracle_ratings == 5
    assert [len(r.scores) for r in res.records] == [2, 2, 1]
    assert res.info["round_sampling"][0] == [] and len(res.info["round_sampling"][1]) == 1
    for r in res.records:
        assert_images(r.images, len(r.scores))
    assert sorted(res.checkpoints) == [2, 5]
    assert_images(res.checkpoints[5], 3)
    assert_images(res.sample(4, torch.Generator().manual_seed(1)), 4)
