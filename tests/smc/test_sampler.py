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

from dataclasses import replace

from apa import GaussianMixturePrior, fkc_sample
from apa.config import SamplerConfig
from apa.priors.gmm import make_gmm
from apa.smc import fkc, sampler
from apa.smc.weighting import ExactWeights

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


def _z_scores(weights: str) -> torch.Tensor:
    prior = make_gmm({})
    target = prior.tilted(A, 2.0)
    est = []
    for seed in range(SEEDS):
        res = fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=N, steps=STEPS, beta=(0.5, 2.0), reward_at="xt",
                                                 weights=weights), generator=torch.Generator().manual_seed(seed))
        est.append(_statistics(target, res.particles, res.log_weights))
    e = torch.stack(est)
    se = e.std(0) / math.sqrt(SEEDS)
    keep = se > 0  # the negligible first component can have zero spread in both
    return ((e.mean(0) - _truth(target)) / se)[keep]


def _critical(num_stats: int) -> float:
    return float(stats.t.ppf(1 - 1e-4 / (2 * num_stats), df=SEEDS - 1))


def test_fkc_matches_closed_form_tilted_mixture():
    z = _z_scores("exact")
    assert z.abs().max() < _critical(len(z)), z


def test_unweighted_guidance_is_measurably_biased():
    z = _z_scores("none")
    assert z.abs().max() > _critical(len(z)), z


def test_beta_zero_is_the_plain_ancestral_sampler():
    prior = make_gmm({})
    noise = torch.randn(10, 64, 2, generator=torch.Generator().manual_seed(3))
    init = prior.sample_initial(64, float(prior.sigmas(10)[0]), torch.Generator().manual_seed(4))
    res = fkc_sample(prior, lambda z: z.sum(1), SamplerConfig(particles=64, steps=10, beta=(0.0, 0.0)), initial=init,
                     noise_fn=lambda i, shape, g: noise[i])
    z, sig = init, prior.sigmas(10)
    for i in range(10):
        z = prior.transition(z, prior.eps(z, float(sig[i])), float(sig[i]), float(sig[i + 1]), noise[i])
    assert torch.allclose(res.particles, z, atol=1e-6)
    assert torch.allclose(res.log_weights, torch.full((64,), -math.log(64), dtype=torch.float64))


def test_reproducible_from_seed():
    prior = make_gmm({})
    runs = [fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=32, steps=20, reward_at="xt"),
                       generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0].particles, runs[1].particles)
    assert torch.equal(runs[0].log_weights, runs[1].log_weights)


def _trajectory(cfg: SamplerConfig, n: int = 16, seed: int = 0):
    """Every state of one run (with injected noise) and the noise: ([state_0..state_S], [S, n, 2])."""
    prior = make_gmm({})
    sched = fkc.Schedule.of(prior, cfg)
    noise = torch.randn(cfg.steps, n, 2, generator=torch.Generator().manual_seed(seed))
    states = [sampler.init_state(prior, n, sched, torch.Generator().manual_seed(seed + 1))]
    kernel = sampler.kernel_of(prior, lambda z: z @ A, cfg, sched, noise_fn=lambda i, shape, g: noise[i])
    for state, _ in sampler.run(states[0], kernel):
        states.append(state)
    return prior, sched, states, noise


def test_exact_weights_carried_forward_equal_the_path_formula():
    """Without resampling, the final weight is recomputed from the path alone, independently of the
    sampler's bookkeeping: φ_0 ... φ_{N-1} telescope, leaving log w = β_end·r(z_N) + Σ_i [log N(z_{i+1};
    m_i, v_i) − log N(z_{i+1}; m_i + δ_i, v_i)] with m_i the plain ancestral mean, δ_i = (g²ds_i/2)·β_i·a
    (r = ⟨a, z⟩, so ∇r = a) and no shift on the deterministic last step. A weight reset, a lost or
    double-counted increment, a wrong sign or a missing final potential each break the equality."""
    cfg = SamplerConfig(steps=6, beta=(0.5, 2.0), reward_at="xt", resample="none")
    prior, sched, states, noise = _trajectory(cfg)
    expected = sched.betas[-1] * (states[-1].particles.double() @ A.double())
    for i in range(cfg.steps):
        z, z_next = states[i].particles, states[i + 1].particles
        sig, sig_next, beta, _ = sched.at(i)
        v = prior.transition_variance(sig, sig_next)
        if v == 0.0:
            continue
        m = prior.transition(z, prior.eps(z, sig), sig, sig_next, torch.zeros_like(z)).double()
        delta = 0.5 * (sig**2 - sig_next**2) * beta * A.double()
        normal = lambda mean: torch.distributions.Normal(mean, v**0.5).log_prob(z_next.double()).sum(1)  # noqa: E731
        expected += normal(m) - normal(m + delta)
    assert torch.allclose(states[-1].log_weights, expected - torch.logsumexp(expected, 0), atol=1e-6)
    assert states[-1].log_weights.std() > 0.1  # the weights really were carried, not reset


def test_resampling_resets_the_weights():
    """Rate-form weights have no move term, so a resampled step must leave exactly 1/N; a step that
    does not resample must leave them unequal (carried forward)."""
    cfg = SamplerConfig(steps=12, beta=(3.0, 6.0), reward_at="xt", weights="rate", ess_threshold=0.9)
    prior = make_gmm({})
    sched = fkc.Schedule.of(prior, cfg)
    state = sampler.init_state(prior, 64, sched, torch.Generator().manual_seed(0))
    seen = set()
    for state, info in sampler.run(state, sampler.kernel_of(prior, lambda z: z @ A, cfg, sched,
                                                                  generator=torch.Generator().manual_seed(1))):
        uniform = torch.allclose(state.log_weights, torch.full((64,), -math.log(64), dtype=torch.float64))
        assert uniform == info.resampled, info
        seen.add(info.resampled)
    assert seen == {True, False}


def test_resampling_records_the_trace():
    res = fkc_sample(make_gmm({}), lambda z: 5 * z @ A, SamplerConfig(particles=64, steps=20, ess_threshold=1.0, reward_at="xt"),
                     generator=torch.Generator().manual_seed(0))
    assert len(res.trace) == 20
    assert any(s.resampled for s in res.trace)
    assert all(1.0 <= s.ess <= 64 + 1e-9 for s in res.trace)
    assert res.origins is not None and res.trace[-1].unique_origins == int(res.origins.unique().numel())


class _Counting:
    """Wraps a prior's ε and a reward, counting the calls."""

    def __init__(self, prior):
        self.prior, self.eps_calls, self.reward_calls = prior, 0, 0
        self._eps = prior.eps
        prior.eps = self.eps

    def eps(self, z, sigma):
        self.eps_calls += 1
        return self._eps(z, sigma)

    def reward(self, z):
        self.reward_calls += 1
        return z @ A


@pytest.mark.parametrize("reward_at, extra", [("tweedie", 0), ("xt", 1)])
def test_exact_weights_cost_one_network_call_per_step(reward_at, extra):
    """One ε call per step; the final potential reuses r(ẑ0) of the last step (tweedie) or costs one reward call (xt)."""
    count = _Counting(make_gmm({}))
    fkc_sample(count.prior, count.reward, SamplerConfig(particles=8, steps=7, reward_at=reward_at),
               generator=torch.Generator().manual_seed(0))
    assert count.eps_calls == 7 and count.reward_calls == 7 + extra


def test_reweighting_every_kth_step_calls_the_reward_at_those_steps_alone():
    """--reweight-every 3 over 7 steps: ε at every step, the reward at steps 6, 3 and 0 (counted back
    from the last), so a step between reweights costs one network row, not the reward's too."""
    count = _Counting(make_gmm({}))
    res = fkc_sample(count.prior, count.reward, SamplerConfig(particles=8, steps=7, reweight_every=3),
                     generator=torch.Generator().manual_seed(0))
    assert count.eps_calls == 7 and count.reward_calls == 3
    assert [s.resampled for s in res.trace if s.step not in (0, 3, 6)] == [False] * 4


def test_final_potential_reuse_equals_a_fresh_reward_call():
    """With r read at ẑ0 the last (deterministic) step lands on ẑ0, so reusing r(ẑ0) is exact: the final
    weights equal the previous state's plus β_end·r called afresh on the clean sample."""
    cfg = SamplerConfig(steps=5, beta=(0.5, 2.0), reward_at="tweedie", jacobian="gaussian", resample="none")
    prior, sched, states, _ = _trajectory(cfg)
    before, last = states[-2], states[-1]  # the last step adds its move's increment and the last move's
    phi_end = sched.betas[-1] * (last.particles.double() @ A.double())  # φ_N called afresh on the clean sample
    fresh = before.log_weights + ExactWeights.completed(phi_end, before.move)  # φ_{N−1} cancels
    assert torch.allclose(last.log_weights, fresh - torch.logsumexp(fresh, 0), atol=1e-6)


def test_nan_reward_raises_naming_the_step():
    prior = make_gmm({})

    def reward(z):
        r = z @ A
        return torch.where(z[:, 0] > 1e9, r, r * float("nan")) if reward.calls > 2 else (reward.__setattr__("calls", reward.calls + 1) or r)

    reward.calls = 0
    with pytest.raises(FloatingPointError, match=r"step 3: the reward is not finite"):
        fkc_sample(prior, reward, SamplerConfig(particles=8, steps=10), generator=torch.Generator().manual_seed(0))


def test_seed_clamp_bounds_the_accumulated_log_weights():
    """The seed's clamp: with a steep reward the accumulated log-weights reach ±100 and stop there,
    so the result differs from the unclamped run; nothing is ever outside [−100, 100]."""
    cfg = SamplerConfig(steps=10, beta=(0.5, 2.0), reward_at="xt", weights="rate", resample="none", clamp=100.0)
    prior = make_gmm({})
    sched = fkc.Schedule.of(prior, cfg)
    state = sampler.init_state(prior, 32, sched, torch.Generator().manual_seed(0))
    steep = lambda z: 50 * z @ A  # noqa: E731
    hit = False
    kernel = sampler.kernel_of(prior, steep, cfg, sched, generator=torch.Generator().manual_seed(1))
    for state, _ in sampler.run(state, kernel):
        assert state.log_weights.abs().max() <= 100.0
        hit = hit or bool((state.log_weights.abs() == 100.0).any())
    assert hit
    free = fkc_sample(prior, steep, replace(cfg, clamp=None), generator=torch.Generator().manual_seed(1),
                      initial=sampler.init_state(prior, 32, sched, torch.Generator().manual_seed(0)).particles)
    assert not torch.allclose(free.log_weights, state.log_weights - torch.logsumexp(state.log_weights, 0))


def test_bad_configuration_is_refused():
    prior = make_gmm({})
    with pytest.raises(ValueError, match="--reward-at"):
        fkc_sample(prior, lambda z: z[:, 0], SamplerConfig(particles=4, steps=2, reward_at="x0"))
    with pytest.raises(ValueError, match="--ess-threshold"):
        fkc_sample(prior, lambda z: z[:, 0], SamplerConfig(particles=4, steps=2, ess_threshold=2.0))
    with pytest.raises(ValueError, match="unknown --resample 'bogus'"):
        fkc_sample(prior, lambda z: z[:, 0], SamplerConfig(particles=4, steps=2, resample="bogus"))
    with pytest.raises(ValueError, match="--steps must be a whole number of at least 1"):
        fkc_sample(prior, lambda z: z[:, 0], SamplerConfig(particles=4, steps=0))
    with pytest.raises(ValueError, match="--beta must be two finite numbers"):
        SamplerConfig(beta=(float("nan"), 8.0))
    with pytest.raises(TypeError, match="particles"):  # settings come in the config object, never as keywords
        fkc_sample(prior, lambda z: z[:, 0], particles=4)
    with pytest.warns(UserWarning, match="literal"):
        SamplerConfig(reward_at="tweedie", jacobian="identity")


# ---------------------------------------------------------------- exactness at the step counts people run

DISC_SEEDS, DISC_N, REF_M, REF_BATCHES = 24, 4096, 1 << 20, 16


def _disc_statistics(prior_t: GaussianMixturePrior, x: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Weighted component probabilities [K] and mean [2]."""
    w = torch.exp(log_w.double() - torch.logsumexp(log_w.double(), 0))
    return torch.cat([(w[:, None] * prior_t.responsibilities(x, 0.0).double()).sum(0), (w[:, None] * x.double()).sum(0)])


@pytest.fixture(scope="module")
def discrete_reference():
    """Per step count: the plain sampler (β = 0) with 2^20 particles reweighted at the end by
    exp(β_end·⟨a, x0⟩): the law exact SMC weights target at that step count. -> (statistics, their SE),
    the SE from 16 batch means."""
    prior = make_gmm({})
    target = prior.tilted(A, 2.0)
    out = {}
    for steps in (10, 25):
        res = fkc_sample(prior, lambda z: torch.zeros(z.shape[0]), SamplerConfig(particles=REF_M, steps=steps, beta=(0.0, 0.0)),
                         generator=torch.Generator().manual_seed(999))
        lw = 2.0 * (res.particles.double() @ A.double())
        full = _disc_statistics(target, res.particles, lw)
        parts = torch.stack([_disc_statistics(target, x, l) for x, l in
                             zip(res.particles.chunk(REF_BATCHES), lw.chunk(REF_BATCHES))])
        out[steps] = (full, parts.std(0) / math.sqrt(REF_BATCHES))
    return out


def _disc_z(discrete_reference, steps: int, **settings) -> torch.Tensor:
    prior = make_gmm({})
    target = prior.tilted(A, 2.0)
    est = torch.stack([_disc_statistics(target, *_run(prior, steps, seed, settings)) for seed in range(DISC_SEEDS)])
    ref, ref_se = discrete_reference[steps]
    se = (est.var(0) / DISC_SEEDS + ref_se**2).sqrt()
    keep = se > 1e-12
    return ((est.mean(0) - ref) / se)[keep]


def _run(prior, steps: int, seed: int, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    res = fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=DISC_N, steps=steps, beta=(0.5, 2.0), **settings),
                     generator=torch.Generator().manual_seed(seed))
    return res.particles, res.log_weights


def _disc_critical(num_stats: int, level: float = 1e-4) -> float:
    return float(stats.t.ppf(1 - level / (2 * num_stats), df=DISC_SEEDS - 1))


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("twist", [dict(reward_at="xt"), dict(reward_at="tweedie", jacobian="gaussian")],
                         ids=["r(z_t)", "r(x0_hat)"])
def test_exact_weights_hit_the_discrete_target(discrete_reference, steps, twist):
    """Exact weights at 10 and 25 steps match the reweighted plain-sampler reference, whatever the twist.

    24 seeds of N = 4096 give each of 5 statistics (component probabilities, mean) as a mean with its
    standard error (seed spread / √24, combined with the reference's batch-means SE); the test fails
    when a |z| exceeds Student's t at family-wise level 1e-4 (df 23: about 5.0). It detects a bias of
    about 5 standard errors, about 1.5x the i.i.d. floor of one run at N = 4096 (benchmarks/exactness.py
    measures exact SMC at 1.0-1.6x that floor, the rate form at 7-38x)."""
    z = _disc_z(discrete_reference, steps, weights="exact", **twist)
    assert z.abs().max() < _disc_critical(len(z)), z


@pytest.mark.parametrize("settings", [dict(beta_schedule="signal"), dict(beta_schedule="signal", drift=0.0),
                                      dict(beta_schedule="signal", reweight_every=5),
                                      dict(beta_schedule="signal", drift=0.0, reweight_every=5)],
                         ids=["signal beta", "signal beta, no drift", "reweight every 5th step",
                              "reweight every 5th step, no drift"])
def test_the_beta_schedule_and_the_drift_change_the_variance_not_the_target(discrete_reference, settings):
    """The signal-share β schedule (β_i from s²/(s²+σ_i²)), the gradient-free move (drift 0, the prior's
    own kernel) and reweighting at every 5th step only (the prior's own moves between, the last shifted
    move's proposal ratio carried to the next reweight) keep the exact weights' target at 25 steps: the
    same test, the same power, as above."""
    z = _disc_z(discrete_reference, 25, weights="exact", reward_at="tweedie", jacobian="gaussian", **settings)
    assert z.abs().max() < _disc_critical(len(z)), z


def test_the_signal_schedule_rises_with_the_signal_share_and_ends_at_beta_end():
    from apa.smc.fkc import signal_schedule

    sigmas = torch.tensor([100.0, 3.0, 1.0, 0.6, 0.1, 0.0], dtype=torch.float64)
    b = signal_schedule(0.5, 2.0, sigmas, 0.6)
    assert b[-1] == pytest.approx(2.0, abs=1e-12) and (b[1:] >= b[:-1]).all() and abs(b[0] - 0.5) < 1e-4
    assert b[3] == pytest.approx(0.5 + 1.5 * 0.5)  # σ = s: half the signal


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("weights", ["rate", "none"])
def test_rate_weights_and_guidance_fail_the_same_test(discrete_reference, weights, steps):
    """The test above has power: the seed's rate-form weights and unweighted guidance fail it at 10 and
    at 25 steps (measured |z| 88-250 against a critical value of about 5)."""
    z = _disc_z(discrete_reference, steps, weights=weights, reward_at="xt")
    assert z.abs().max() > _disc_critical(len(z)), z


def test_exact_weights_from_a_restart_hit_their_target():
    """A run started at grid point k from given particles (the final batch's restart from liked images)
    targets the plain sampler's law from those particles, tilted by exp(β_end·r): checked like the
    test above, against 2^20 plain draws from the same start reweighted at the end (24 seeds, N = 4096)."""
    prior = make_gmm({})
    target = prior.tilted(A, 2.0)
    steps, k = 25, 17
    sigma_k = float(prior.sigmas(steps)[k])
    anchors = torch.tensor([[-2.0, 0.3], [1.5, -0.2], [0.2, 2.2], [2.5, 0.5]])

    def start(n, seed):
        g = torch.Generator().manual_seed(seed)
        return anchors[torch.randint(0, 4, (n,), generator=g)] + sigma_k * torch.randn(n, 2, generator=g)

    ref_run = fkc_sample(prior, lambda z: torch.zeros(z.shape[0]), SamplerConfig(particles=REF_M, steps=steps, beta=(0.0, 0.0)),
                         initial=start(REF_M, 999), start_step=k, generator=torch.Generator().manual_seed(998))
    lw = 2.0 * (ref_run.particles.double() @ A.double())
    ref = _disc_statistics(target, ref_run.particles, lw)
    parts = torch.stack([_disc_statistics(target, x, l) for x, l in
                         zip(ref_run.particles.chunk(REF_BATCHES), lw.chunk(REF_BATCHES))])
    ref_se = parts.std(0) / math.sqrt(REF_BATCHES)
    est = torch.stack([_disc_statistics(target, *(lambda r: (r.particles, r.log_weights))(
        fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=DISC_N, steps=steps, beta=(0.5, 2.0), reward_at="tweedie",
                                                 jacobian="gaussian"), initial=start(DISC_N, seed), start_step=k,
                   generator=torch.Generator().manual_seed(seed))))
        for seed in range(DISC_SEEDS)])
    se = (est.var(0) / DISC_SEEDS + ref_se**2).sqrt()
    z = ((est.mean(0) - ref) / se)[se > 1e-12]
    assert z.abs().max() < _disc_critical(len(z)), z
    unweighted = _disc_statistics(target, ref_run.particles, torch.zeros_like(lw))
    assert ((unweighted - ref).abs() / se).max() > 10 * _disc_critical(len(z))  # the tilt matters here


def test_a_restart_needs_its_particles_and_a_step_inside_the_grid():
    prior = make_gmm({})
    with pytest.raises(ValueError, match="needs its initial particles"):
        fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=4, steps=5), start_step=2)
    with pytest.raises(ValueError, match="start_step must be in"):
        fkc_sample(prior, lambda z: z @ A, SamplerConfig(particles=4, steps=5), start_step=5, initial=torch.zeros(4, 2))
