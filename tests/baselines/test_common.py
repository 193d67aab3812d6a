"""The budget schedule and the rating counter every method shares."""

import pytest
import torch

from apa import baselines
from apa.baselines.common import BudgetError, CountingUser, check_checkpoints, round_sizes, to_targets
from apa.feedback.base import CAPABILITIES, FeedbackSource
from apa.feedback.human import HumanFeedback


def test_round_sizes_spend_exactly_the_budget():
    assert round_sizes(20, 8) == [8, 8, 4]
    assert round_sizes(16, 8) == [8, 8]
    assert round_sizes(3, 8) == [3]
    with pytest.raises(BudgetError):
        round_sizes(0, 8)


def test_checkpoints_must_be_reached():
    assert check_checkpoints([16, 8, 20], 20, 8) == (8, 16, 20)
    with pytest.raises(BudgetError, match=r"\[12\]"):
        check_checkpoints([12], 20, 8)


def test_counting_user_counts_ratings_only():
    class U(FeedbackSource):
        name, prefer, confidence, mode = "u", (1,), 0.9, "graded"
        taste, classifier = object(), torch.nn.Identity()

        def __call__(self, x):
            return torch.ones(x.shape[0])

        def evaluate(self, x):
            return {"n": x.shape[0]}

    u = CountingUser(U())
    u(torch.zeros(3, 1, 28, 28))
    u.evaluate(torch.zeros(5, 1, 28, 28))
    assert u.rated == 3 and u.prefer == (1,) and u.name == "u"
    assert all(getattr(u, c) == getattr(u.user, c) for c in CAPABILITIES)  # each declared one, uncounted
    with pytest.raises(AttributeError):
        u.mode  # noqa: B018 - the source's own attribute, declared nowhere, is not forwarded


def test_counting_a_person_offers_no_view_of_a_batch():
    u = CountingUser(HumanFeedback())
    assert u.scale == (1.0, 5.0) and u.evaluate is None and u.prefer is None and u.probabilities is None


def test_targets_map_a_scale_onto_minus_one_one():
    class Graded(FeedbackSource):
        name, scale = "graded", (0.0, 1.0)

    class Binary(FeedbackSource):
        name = "binary"  # declares no scale: the binary default

    assert to_targets(torch.tensor([0.0, 0.5, 1.0]), Graded()).tolist() == [-1.0, 0.0, 1.0]
    assert to_targets(torch.tensor([1.0, -1.0]), Binary()).tolist() == [1.0, -1.0]


def test_every_method_is_registered_with_one_signature():
    import inspect

    for name in baselines.METHODS:
        params = list(inspect.signature(baselines.get(name)).parameters)
        assert params[:5] == ["prior", "user", "budget", "per_round", "seed"], name
        assert {"config", "checkpoints", "eval_samples", "workdir"} <= set(params), name
    with pytest.raises(ValueError, match="unknown method"):
        baselines.get("nope")
