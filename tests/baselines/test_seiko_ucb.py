"""SEIKO-UCB: the trajectory KL against the closed form, the UCB bonus, one fine-tuning step on a known
reward, and a tiny online run that spends exactly its budget."""

import copy

import pytest
import torch

from apa.baselines import online
from apa.baselines.common import plain_samples
from apa.baselines.papa import SwitchedPrior
from apa.baselines.seiko_ucb import (SEIKOConfig, finetune, optimistic_reward, reference_for, rollout, run_seiko_ucb,
                                     step_kl, transition_mean)
from apa.registry import METHODS

from .conftest import AlternatingUser, assert_images, tiny_unet


def _perturbed(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` with every weight moved by scale·N(0, 1) (a network near the reference)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return out.requires_grad_(False)


def _mean_over_noise(policy: SwitchedPrior, reference: SwitchedPrior, objective, n: int, seed: int, steps: int = 3):
    """(mean objective of x0 [n], trajectory KL [n]) from one fixed stream of noise (common random numbers)."""
    with torch.no_grad():
        x0, kl = rollout(policy, reference, n, steps, 0, torch.Generator().manual_seed(seed))
        return objective(x0), kl


def test_one_step_kl_is_the_gaussian_kl_of_the_ancestral_transition(tiny_prior):
    """step_kl against a Monte Carlo estimate of E_x~p_θ[log p_θ(x) − log p_ref(x)] over the prior's own
    transitions: catches a mean or a variance that is not the transition's (the estimate has std
    sqrt(2·KL/M), so 4 std is the tolerance), and a KL that is not exactly 0 for the same network."""
    policy = SwitchedPrior(tiny_prior, _perturbed(tiny_prior.model, 0.02, 1))
    reference = SwitchedPrior(tiny_prior, tiny_prior.model)
    sig = tiny_prior.sigmas(5)
    s, s_next = float(sig[2]), float(sig[3])
    v = tiny_prior.transition_variance(s, s_next)
    z = tiny_prior.sample_initial(2, s, torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = policy.eps(z, s)
        mu, mu_ref = transition_mean(policy, z, s, s_next, eps), transition_mean(reference, z, s, s_next)
        kl = step_kl(mu, mu_ref, v)
        m = 4000
        xi = torch.randn(m, *z.shape, generator=torch.Generator().manual_seed(1))
        x = torch.stack([policy.transition(z, eps, s, s_next, xi[j]) for j in range(m)])  # [M, 2, ...]
        log_ratio = ((x - mu_ref).pow(2).sum((2, 3, 4)) - (x - mu).pow(2).sum((2, 3, 4))) / (2 * v)  # [M, 2]
        assert step_kl(mu, mu, v).abs().max() == 0.0
    assert (kl > 0.5).all()  # a change big enough for the check to mean something
    assert ((log_ratio.mean(0) - kl).abs() < 4 * (2 * kl / m).sqrt()).all()


def test_trajectory_kl_is_zero_for_the_unmodified_copy_and_skips_untracked_steps(tiny_prior):
    """The rollout's Σ_i KL_i: exactly 0 when the tuned network is an unmodified copy of the reference;
    positive for a changed one; and 0 again when only the last, deterministic step (σ' = 0, no KL)
    is backpropagated; the network builds a graph only from the truncation step on. Catches a KL on the
    wrong network, on detached steps or on the noiseless step, and truncation that is not applied."""
    reference = SwitchedPrior(tiny_prior, tiny_prior.model)
    same = SwitchedPrior(tiny_prior, copy.deepcopy(tiny_prior.model))
    changed = SwitchedPrior(tiny_prior, _perturbed(tiny_prior.model, 0.02, 2))
    with torch.no_grad():
        _, kl_same = rollout(same, reference, 3, 4, 0, torch.Generator().manual_seed(0))
        _, kl_changed = rollout(changed, reference, 3, 4, 0, torch.Generator().manual_seed(0))
        _, kl_last = rollout(changed, reference, 3, 4, 3, torch.Generator().manual_seed(0))
    assert kl_same.abs().max() == 0.0 and (kl_changed > 0).all() and kl_last.abs().max() == 0.0
    assert tiny_prior.transition_variance(float(tiny_prior.sigmas(4)[3]), 0.0) == 0.0
    spy = _GradSpy(changed.tuned)
    rollout(SwitchedPrior(tiny_prior, spy), reference, 2, 4, 2, torch.Generator().manual_seed(0))
    assert spy.modes == [False, False, True, True]  # truncated: a graph only from step 2 on


class _GradSpy(torch.nn.Module):
    """A network that records whether each call builds a graph."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net, self.modes = net, []

    def forward(self, x, t):
        self.modes.append(torch.is_grad_enabled())
        return self.net(x, t)


def test_ucb_bonus_is_the_ridge_formula_and_larger_away_from_rated_points(tiny_prior):
    """r̃ = r + min(c·sqrt(φᵀ(λI + ΦᵀΦ)⁻¹φ), clip), checked against a float64 solve; at rated points
    sqrt(φᵀΣ⁻¹φ) is a ridge leverage, below 1 exactly, while unrated images have feature directions
    the 4 rated ones do not span (λ = 1e-3), so their bonus is larger. Catches a missing bonus, a
    wrong covariance, a bonus on the wrong side of the clip, and c applied after the clip."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, 28, 28, generator=gen) * 2 - 1
    rated, fresh = x[:4], x[4:]
    reward = online.refit(tiny_prior, rated, torch.tensor([1.0, -1.0, 1.0, -1.0]), 0, 0,
                          config=online.FitConfig(epochs=5))
    cov = online.rated_covariance(reward, rated, 1e-3)
    coef = 0.01
    with torch.no_grad():
        phi = online.last_hidden(reward, x).double()
        sigma = 1e-3 * torch.eye(phi.shape[1], dtype=torch.float64) + phi[:4].T @ phi[:4]
        bonus = torch.einsum("nh,hn->n", phi, torch.linalg.solve(sigma, phi.T)).sqrt()
        got = optimistic_reward(reward, cov, coef, 10.0)(x) - reward(x)
        clipped = optimistic_reward(reward, cov, coef, 0.005)(x) - reward(x)
    assert torch.allclose(got.double(), coef * bonus, rtol=1e-3)
    assert (bonus[:4] < 1.0).all() and bonus[4:].min() > bonus[:4].max()
    assert torch.allclose(clipped.double(), (coef * bonus).clamp(max=0.005), rtol=1e-3, atol=1e-7)


def test_a_finetuning_step_on_a_linear_reward_raises_the_mean_reward(tiny_prior):
    """With r(x) = mean pixel value and no KL, a few clipped steps must raise r of samples drawn from the
    same noise. The test compares paired samples and requires the mean gain to exceed 4 standard errors
    of the paired differences: catches a sign error, a gradient that does not reach the network, or
    steps that do not move it."""
    linear = lambda x: x.mean(dim=(1, 2, 3))  # noqa: E731
    policy = SwitchedPrior(tiny_prior, copy.deepcopy(tiny_prior.model).requires_grad_(True))
    reference = SwitchedPrior(tiny_prior, tiny_prior.model)
    before, _ = _mean_over_noise(policy, reference, linear, 64, seed=7)
    cfg = SEIKOConfig(steps=3, lr=1e-3, kl_weight=0.0, reward_coef=1.0, inner_steps=5, batch_size=4)
    stats = finetune(policy, reference, linear, cfg, torch.Generator().manual_seed(3))
    after, _ = _mean_over_noise(policy, reference, linear, 64, seed=7)
    gain = after - before
    assert len(stats) == 5 and all(0 <= s["start"] <= 2 for s in stats)
    assert gain.mean() > 4 * gain.std() / 64**0.5


def test_kl_steps_pull_a_moved_network_back_toward_the_reference(tiny_prior):
    """With no reward (reward_coef = 0) the objective is the trajectory KL alone: a few steps must lower it,
    measured on the same noise before and after. Catches a KL term with the wrong sign or no gradient."""
    reference = SwitchedPrior(tiny_prior, tiny_prior.model)
    policy = SwitchedPrior(tiny_prior, _perturbed(tiny_prior.model, 0.02, 4).requires_grad_(True))
    zero = lambda x: torch.zeros(x.shape[0])  # noqa: E731
    _, before = _mean_over_noise(policy, reference, zero, 16, seed=5)
    cfg = SEIKOConfig(steps=3, lr=1e-3, reward_coef=0.0, kl_weight=1.0, inner_steps=5, batch_size=4,
                      truncate_max=0)
    finetune(policy, reference, zero, cfg, torch.Generator().manual_seed(6))
    _, after = _mean_over_noise(policy, reference, zero, 16, seed=5)
    assert after.mean() < 0.9 * before.mean()


def test_the_kl_reference_is_a_frozen_snapshot_or_the_prior(tiny_prior):
    """"previous": a copy of the tuned network as it stands (later steps do not move it); "pretrained":
    the prior's own network. Catches a reference that shares parameters with the network being tuned."""
    policy = SwitchedPrior(tiny_prior, _perturbed(tiny_prior.model, 0.01, 3).requires_grad_(True))
    prev = reference_for(tiny_prior, policy, SEIKOConfig())
    assert prev.tuned is not policy.tuned and not any(p.requires_grad for p in prev.tuned.parameters())
    assert all(torch.equal(a, b) for a, b in zip(prev.tuned.parameters(), policy.tuned.parameters()))
    assert reference_for(tiny_prior, policy, SEIKOConfig(kl_reference="pretrained")).tuned is tiny_prior.model
    with pytest.raises(ValueError, match="kl_reference"):
        SEIKOConfig(kl_reference="base")
    with pytest.raises(ValueError, match="truncate"):
        SEIKOConfig(truncate_min=3, truncate_max=1)


class _Tally(AlternatingUser):
    """The alternating user, counting every image it is shown."""

    def __init__(self):
        super().__init__()
        self.shown = 0

    def __call__(self, images):
        self.shown += images.shape[0]
        return super().__call__(images)


def test_seiko_runs_online_and_spends_exactly_the_budget(tiny_prior):
    """Budget 6 in rounds of 4: rounds [4, 2], 6 images shown to the user, checkpoints at 4 and 6, images
    in [0, 1] of the right shape, the prior's network untouched and the tuned one moved; one stats
    entry per optimiser step. Catches over- or under-spending, a fine-tuned base and a frozen copy."""
    base_state = {k: v.clone() for k, v in tiny_prior.model.state_dict().items()}
    user = _Tally()
    cfg = SEIKOConfig(steps=3, lr=1e-3, inner_steps=2, batch_size=2)
    res = run_seiko_ucb(tiny_prior, user, 6, 4, 0, config=cfg, checkpoints=(4, 6), eval_samples=3)
    assert METHODS.get("seiko_ucb") is run_seiko_ucb and res.method == "seiko_ucb"
    assert [r.spent for r in res.records] == [4, 6] and res.oracle_ratings == 6 and user.shown == 6
    assert [r.scores for r in res.records] == [(1.0, -1.0, 1.0, -1.0), (1.0, -1.0)]
    assert_images(res.records[0].images, 4)
    assert_images(res.records[1].images, 2)
    assert sorted(res.checkpoints) == [4, 6]
    assert_images(res.checkpoints[6], 3)
    assert_images(res.sample(5, torch.Generator().manual_seed(0)), 5)
    assert all(torch.equal(v, tiny_prior.model.state_dict()[k]) for k, v in base_state.items())
    moved = res.sample(3, torch.Generator().manual_seed(1))
    assert not torch.equal(moved, plain_samples(tiny_prior, 3, 3, torch.Generator().manual_seed(1)))
    assert [len(s) for s in res.info["finetune"]] == [2, 2] and res.info["config"]["steps"] == 3
