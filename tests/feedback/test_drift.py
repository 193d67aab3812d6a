"""A user whose taste changes: which taste answers each rating, and a session resumed across the switch.

The stubs answer +1 (the old taste) and -1 (the new one), so every score says which taste gave it.
An off-by-one in the switch, a coin that depends on the call rather than the rating index, or a
session that does not tell the user its count on resume, each changes the answers checked here.
"""

import math

import torch

from apa.session.lifecycle import FINAL, drive
from apa.config import AlignConfig
from apa.feedback.base import CAPABILITIES, FeedbackSource
from apa.feedback.drift import DriftingUser
from apa.feedback.human import HumanFeedback
from apa.session import Session, with_overrides


class Constant(FeedbackSource):
    def __init__(self, value: float, name: str):
        self.value, self.name, self.prefer = value, name, (int(value > 0),)
        self.confidence, self.taste, self.classifier = 0.5 + value / 4, object(), torch.nn.Identity()

    def __call__(self, images):
        return torch.full((images.shape[0],), self.value)

    def evaluate(self, images):
        return {"taste": self.name}

    def probabilities(self, images):
        return torch.full((images.shape[0], 2), self.value)


def user(at: int, span: int = 0, seed: int = 0) -> DriftingUser:
    return DriftingUser(Constant(1.0, "old"), Constant(-1.0, "new"), at, span, seed)


def test_an_abrupt_switch_answers_by_the_old_taste_up_to_the_switch_and_by_the_new_after():
    u = user(at=5)
    scores = torch.cat([u(torch.zeros(3, 1, 2, 2)) for _ in range(3)])  # ratings 0..8 in three questions
    assert scores.tolist() == [1.0] * 5 + [-1.0] * 4
    assert u.evaluate(None) == {"taste": "new"} and u.prefer == (0,)


def test_every_capability_but_the_scale_is_the_current_tastes():
    """Before the switch the old taste's objects, after it the new one's (a final batch is judged by the
    taste at the end); the scale is the two tastes' own."""
    u = user(at=2)
    for source in (u.before, u.after):
        assert u.current() is source
        assert all(getattr(u, c) == getattr(source, c) for c in CAPABILITIES if c != "scale"), source.name
        assert u.probabilities(torch.zeros(1, 1, 1, 1)).tolist() == [[source.value] * 2]
        u(torch.zeros(2, 1, 1, 1))
    assert u.scale == (-1.0, 1.0)


def test_a_drifting_person_offers_no_view_of_a_batch():
    """Around sources that declare no evaluate, the drifting user declares none either (not a method that fails)."""
    u = DriftingUser(HumanFeedback(), HumanFeedback(), at=1)
    assert u.evaluate is None and u.prefer is None and u.probabilities is None and u.scale == (1.0, 5.0)


def test_a_gradual_change_follows_its_ramp_within_binomial_error_and_only_the_rating_index_decides():
    at, span, n = 10, 400, 2000
    u = user(at, span, seed=3)
    new = (u(torch.zeros(n, 1, 1, 1)) < 0).float()
    assert new[:at].sum() == 0 and bool((new[at + span:] == 1).all())
    ramp = new[at:at + span]
    p = torch.tensor([u.p_after(at + i) for i in range(span)])
    sd = math.sqrt(float((p * (1 - p)).sum()))
    assert abs(float(ramp.sum() - p.sum())) < 4 * sd  # the mean of the ramp: 0.5 + 1/(2·span)
    again = user(at, span, seed=3).at(at + 100)  # asked again from rating 110 on, in one call of 50
    assert torch.equal(again(torch.zeros(50, 1, 1, 1)) < 0, new[at + 100:at + 150].bool())


def test_a_session_resumed_across_the_switch_hears_the_same_answers(tmp_path):
    cfg = with_overrides(AlignConfig(), feedback={"prefer": (1, 4, 7, 9), "drift_to": (2, 3, 5), "drift_at": 8},
                         session={"budget": 16, "per_round": 4, "eval_samples": 8, "seed": 2},
                         sampler={"particles": 8, "steps": 4}, surrogate={"epochs": 5})
    whole = Session.start(tmp_path / "whole", cfg, progress=False)
    drive(whole, until=FINAL)
    split = Session.start(tmp_path / "split", cfg, progress=False)
    for _ in range(2):  # two rounds (8 ratings, up to the switch), then the process ends
        r = split.next_round()
        split.answer(r)
        split.finish_round(r)
    split.store.close()
    resumed = Session.resume(tmp_path / "split", progress=False)
    assert resumed.feedback is not whole.feedback  # a drifting user is the session's own, never shared
    drive(resumed, until=FINAL)
    scores = lambda s: [x["score"] for x in s.store.ratings()]  # noqa: E731
    assert scores(resumed) == scores(whole) and len(scores(whole)) == 16
    assert whole.feedback.prefer == (2, 3, 5)
    assert torch.equal(resumed.final_samples(), whole.final_samples())  # the same result, to the bit
