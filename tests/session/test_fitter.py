"""SurrogateFitter alone, on 1×8×8 latents (no prior network, no store, no session): a fresh surrogate is a
function of (seed, round), a fitted one survives the store's round trip, and the reward is capped
where the configuration says. Each would catch a resumed session rebuilding a different surrogate."""

from types import SimpleNamespace

import torch

from apa.config import SurrogateConfig
from apa.session.fitter import SurrogateFitter, heldout_score, reads_as_change

PIXELS = SurrogateConfig(kind="pixels", epochs=4, ensemble=2, batch_size=16)
EVENT = (1, 8, 8)


def _prior():  # the pixel surrogate reads only the prior's event shape
    return SimpleNamespace(event_shape=EVENT)


def _latents(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *EVENT, generator=torch.Generator().manual_seed(seed))


def test_a_fresh_surrogate_is_a_function_of_seed_and_round():
    prior = _prior()
    a, b = SurrogateFitter(prior, PIXELS, 3), SurrogateFitter(prior, PIXELS, 3)
    z = _latents(16, 0)
    assert torch.equal(a.new(2)(z), b.new(2)(z))
    assert not torch.equal(a.new(2)(z), a.new(3)(z)) and not torch.equal(a.new(2)(z), SurrogateFitter(prior, PIXELS, 4).new(2)(z))


def test_a_fitted_surrogate_survives_the_round_trip_and_is_scored_on_held_out_ratings():
    prior, gen = _prior(), torch.Generator().manual_seed(1)
    x = torch.randn(32, *EVENT, generator=gen)
    y = torch.where(x.mean((1, 2, 3)) > 0, 1.0, -1.0)  # liked: the brighter half
    fitter = SurrogateFitter(prior, PIXELS, 0)
    model, loss = fitter.fit(0, x, y, None)
    again = fitter.load(0, {k: v.clone() for k, v in model.state_dict().items()})
    assert torch.equal(model(x), again(x)) and loss == loss
    held, pred = heldout_score(again, x, y), again.rating(x).reshape(-1)
    assert held["n"] == 32 and held["accuracy"] == float(((pred > 0) == (y > 0)).float().mean())
    assert held["mae"] == float((pred - y).abs().mean())


def test_the_reward_is_zero_before_feedback_and_capped_for_mse():
    prior = _prior()
    z = _latents(8, 2)
    assert torch.equal(SurrogateFitter(prior, PIXELS, 0).reward(None)(z), torch.zeros(8))
    mse = SurrogateFitter(prior, SurrogateConfig(kind="pixels", loss="mse", ceiling=0.0), 0)
    model = mse.new(0)
    with torch.no_grad():
        assert (mse.reward(model)(z * 100) <= 0.0).all()


def test_a_change_of_taste_is_read_only_after_two_rounds_the_surrogate_got_right():
    wrong = {"accuracy": 0.1}
    assert reads_as_change(0.25, wrong, [0.9, 0.8])
    assert not reads_as_change(0.25, wrong, [0.9])  # still learning: one round before
    assert not reads_as_change(0.25, wrong, [0.6, 0.7])  # it was never right
    assert not reads_as_change(0.25, {"accuracy": 0.5}, [0.9, 0.9]) and not reads_as_change(None, wrong, [1, 1])
