"""PAPA / EPAPA: the losses on hand-made cases, the EPAPA switch, and a tiny online run."""

import pytest
import torch

from apa.baselines.papa import (EPAPA, PAPAConfig, SwitchedPrior, draw_timesteps, noised, papa_loss, papa_scaling,
                                preference_loss, run_epapa, run_papa, similarity_loss)
from apa.priors.ddpm import BETA_END, BETA_START

from .conftest import AlternatingUser, assert_images, tiny_unet

T = 1000


def _beta(t: int) -> float:
    return BETA_START + (BETA_END - BETA_START) * t / (T - 1)


def _acp(t: int) -> float:
    out = 1.0
    for s in range(t + 1):
        out *= 1.0 - _beta(s)
    return out


def test_scaling_is_papas_factor_computed_by_hand():
    for t in (1, 2, 400, 999):
        expected = _beta(t) / ((1 - _beta(t)) * (1 - _acp(t - 1)))
        assert papa_scaling(torch.tensor([t])).item() == pytest.approx(expected, rel=1e-5)
    # t = 1: β_1 / ((1 − β_1)·β_0) ≈ 1.2; at t = 0 the public code's index wraps to ᾱ_{T−1}
    assert papa_scaling(torch.tensor([1])).item() == pytest.approx(1.2, abs=0.02)
    wrapped = _beta(0) / ((1 - _beta(0)) * (1 - _acp(T - 1)))
    assert papa_scaling(torch.tensor([0])).item() == pytest.approx(wrapped, rel=1e-5)
    s = papa_scaling(torch.arange(1, T))
    assert s.argmax() == 0 and (s[499:] < 0.05).all()  # low-noise steps weigh most, high noise ≈ β_t/α_t


def test_timesteps_are_exhaustive_or_stratified_and_unbiased():
    gen = torch.Generator().manual_seed(0)
    t, w = draw_timesteps(400, T, 600, gen)
    assert t.tolist() == list(range(400, T)) and (w == 1).all()
    t, w = draw_timesteps(400, T, 6, gen)
    assert (t >= 400 + 100 * torch.arange(6)).all() and (t < 500 + 100 * torch.arange(6)).all()
    assert w.sum().item() == pytest.approx(600)
    full = papa_scaling(torch.arange(T)).sum().item()
    est = [(w * papa_scaling(t)).sum().item() for t, w in (draw_timesteps(0, T, 10, gen) for _ in range(3000))]
    assert sum(est) / len(est) == pytest.approx(full, rel=0.05)


def test_preference_loss_by_hand_with_a_zero_network():
    x0 = torch.rand(2, 1, 28, 28) * 2 - 1
    noise = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    t, w = torch.tensor([1, 300, 900]), torch.tensor([1.0, 2.0, 3.0])
    zero = lambda x, tt: torch.zeros_like(x)  # noqa: E731
    got = preference_loss(zero, x0, noise, t, w)
    per_image = noise.pow(2).mean(dim=(1, 2, 3))
    expected = per_image * (w * papa_scaling(t)).sum()
    assert torch.allclose(got, expected, rtol=1e-5)
    ident = lambda x, tt: x  # noqa: E731
    xt = noised(x0, noise, t).view(2, 3, 1, 28, 28)
    err = (xt - noise[:, None]).pow(2).mean(dim=(2, 3, 4))
    assert torch.allclose(preference_loss(ident, x0, noise, t, w), (err * w * papa_scaling(t)).sum(1), rtol=1e-5)


def test_feedback_sign_and_similarity_only_on_liked_images():
    tuned, base = tiny_unet(0), tiny_unet(1)
    x0 = torch.rand(1, 1, 28, 28) * 2 - 1
    cfg = PAPAConfig(timesteps_per_image=4, sim_coef=0.0)
    liked = papa_loss(tuned, base, x0, torch.tensor([1.0]), cfg, torch.Generator().manual_seed(3))
    disliked = papa_loss(tuned, base, x0, torch.tensor([-1.0]), cfg, torch.Generator().manual_seed(3))
    assert disliked.item() == pytest.approx(-liked.item(), rel=1e-5)  # disliked images push the loss up
    with_sim = papa_loss(tuned, base, x0, torch.tensor([1.0]), PAPAConfig(timesteps_per_image=4, sim_coef=1.0),
                         torch.Generator().manual_seed(3))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    sim = similarity_loss(tuned, base, x0, noise, torch.tensor([T - 1]))  # public code: at the last timestep
    assert with_sim.item() == pytest.approx(liked.item() + sim.item(), rel=1e-4)
    no_sim = papa_loss(tuned, base, x0, torch.tensor([-1.0]), PAPAConfig(timesteps_per_image=4, sim_coef=1.0),
                       torch.Generator().manual_seed(3))
    assert no_sim.item() == pytest.approx(disliked.item(), rel=1e-5)
    assert similarity_loss(base, base, x0, noise, torch.tensor([10, 500])).item() == 0.0


def test_epapa_trains_only_timesteps_at_or_above_k_and_samples_with_the_base_below(tiny_prior):
    seen = []

    def spy(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    papa_loss(spy, spy, torch.zeros(2, 1, 28, 28), torch.tensor([1.0, -1.0]), EPAPA, torch.Generator())
    assert torch.cat(seen).min() >= 400
    tuned = tiny_unet(5)
    sw = SwitchedPrior(tiny_prior, tuned, k=400)
    sig = lambda t: float(tiny_prior.sigma_of_t(torch.tensor([t])))  # noqa: E731
    assert sw.network_at(sig(399)) is tiny_prior.model and sw.network_at(sig(400)) is tuned
    assert sw.network_at(sig(999)) is tuned
    z = torch.randn(2, 1, 28, 28)
    assert torch.equal(sw.eps(z, sig(100)), tiny_prior.eps(z, sig(100)))
    assert not torch.equal(sw.eps(z, sig(700)), tiny_prior.eps(z, sig(700)))
    assert SwitchedPrior(tiny_prior, tuned, k=0).network_at(sig(0)) is tuned


def test_papa_runs_online_on_a_tiny_budget(tiny_prior):
    base_state = {k: v.clone() for k, v in tiny_prior.model.state_dict().items()}
    cfg = PAPAConfig(lr=1e-3, timesteps_per_image=3, sample_steps=3)
    run = run_papa(tiny_prior, AlternatingUser(), 6, 2, 0, config=cfg, checkpoints=(2, 6), eval_samples=4)
    assert [r.spent for r in run.records] == [2, 4, 6] and run.oracle_ratings == 6
    assert [r.scores for r in run.records] == [(1.0, -1.0)] * 3
    for r in run.records:
        assert_images(r.images, 2)
    assert sorted(run.checkpoints) == [2, 6]
    assert_images(run.checkpoints[6], 4)
    assert_images(run.sample(3, torch.Generator().manual_seed(0)), 3)
    assert all(torch.equal(v, tiny_prior.model.state_dict()[k]) for k, v in base_state.items())  # base frozen
    assert not torch.equal(run.checkpoints[2], run.checkpoints[6])
    assert len(run.info["losses"]) == 3


def test_epapa_run_keeps_k_and_is_named(tiny_prior):
    run = run_epapa(tiny_prior, AlternatingUser(), 2, 2, 0, config=PAPAConfig(timesteps_per_image=2, sample_steps=2),
                    checkpoints=(2,), eval_samples=2)
    assert run.method == "epapa" and run.info["config"]["k"] == 400
    assert_images(run.checkpoints[2], 2)
