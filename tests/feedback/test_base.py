"""Feedback sources: the answer checks, the declared capabilities and the simulated user who errs
(--label-noise).

What these can detect: a wrapper that finds a capability by probing (an ErringUser around a person
that offers an ``evaluate``, or forwards an attribute no source declares); a built-in source that
does not declare the contract; a flip that is not a function of the image and the seed.
"""

import importlib
import inspect

import pytest
import torch

from apa.feedback.base import (BINARY_SCALE, CAPABILITIES, ErringUser, FeedbackError, FeedbackSource, check_scores,
                               with_label_noise)
from apa.feedback.human import HumanFeedback


class Liker(FeedbackSource):
    """Likes images whose mean pixel is above 0.5: scores on the [-1, 1] scale."""

    name = "liker"

    def __call__(self, images):
        return torch.where(images.mean(dim=(1, 2, 3)) > 0.5, 1.0, -1.0)

    def evaluate(self, images):
        return {"true": True}


def _images(n, seed=0):
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_erring_user_flips_about_p_of_answers_and_always_the_same_ones():
    """2,000 images at p = 0.1: the flip count is Binomial(2000, 0.1), so 200 ± 13.4; 5 SD is ±67."""
    images = _images(2000)
    user = ErringUser(Liker(), 0.1, seed=3)
    truth, noisy = Liker()(images), user(images)
    flipped = int((truth != noisy).sum())
    assert abs(flipped - 200) < 67, flipped
    assert torch.equal(noisy, user(images))  # the same image, the same answer (resumable)
    assert torch.equal(noisy[:7], user(images[:7]))  # independent of the batch it comes in
    assert torch.equal(noisy[truth != noisy], -truth[truth != noisy])  # flipped on the scale
    other = ErringUser(Liker(), 0.1, seed=4)(images)
    assert not torch.equal(other, noisy)  # another seed, another user


def test_erring_user_mirrors_graded_answers_and_reports_the_true_user():
    class Graded(FeedbackSource):
        name, scale = "graded", (1.0, 5.0)

        def __call__(self, images):
            return torch.full((images.shape[0],), 2.0)

    user = ErringUser(Graded(), 0.4, seed=0)
    out = user(_images(50))
    assert set(out.tolist()) == {2.0, 4.0}  # 1 + 5 − 2
    assert with_label_noise(Liker(), 0.3, 0).evaluate(_images(2)) == {"true": True}


def test_no_noise_is_the_source_itself_and_bad_rates_are_refused():
    source = Liker()
    assert with_label_noise(source, 0.0, 0) is source
    with pytest.raises(ValueError, match="--label-noise"):
        ErringUser(source, 0.5)


def test_check_scores_refuses_wrong_shapes_and_nan():
    with pytest.raises(FeedbackError, match="returned 2 scores for 3 images"):
        check_scores(torch.zeros(2), 3, "x")
    with pytest.raises(FeedbackError, match="non-finite scores at positions \\[1\\]"):
        check_scores(torch.tensor([0.0, float("nan")]), 2, "x")


class Oracle(FeedbackSource):
    """A simulated user declaring every capability, each a distinct object a test can follow."""

    name, scale, prefer, confidence = "oracle", (0.0, 1.0), (1, 4), 0.9
    taste, classifier = object(), torch.nn.Identity()
    mode = "graded"  # the source's own, declared nowhere

    def __call__(self, images):
        return torch.zeros(images.shape[0])

    def evaluate(self, images):
        return {"n": images.shape[0]}

    def probabilities(self, images):
        return torch.full((images.shape[0], 10), 0.1)


def test_a_source_inherits_the_declared_defaults_nothing_offered():
    """A source that declares only its name offers nothing else: binary scale, every capability None."""

    class Bare(FeedbackSource):
        name = "bare"

        def __call__(self, images):
            return torch.ones(images.shape[0])

    bare = Bare()
    assert bare.scale == BINARY_SCALE
    assert all(getattr(bare, c) is None for c in CAPABILITIES if c != "scale")
    assert isinstance(bare, FeedbackSource)


def test_every_built_in_source_declares_the_contract():
    """Each source class of apa.feedback subclasses FeedbackSource, so it has every capability."""
    modules = ("oracle", "tastes", "clip", "imagenet", "human", "drift", "base")
    sources = [c for m in modules for _, c in inspect.getmembers(importlib.import_module(f"apa.feedback.{m}"),
                                                                 inspect.isclass)
               if c.__module__ == f"apa.feedback.{m}" and "__call__" in vars(c)]
    assert {c.__name__ for c in sources} >= {"OracleUser", "UnionUser", "TasteUser", "ClipPromptUser",
                                             "ImageNetUser", "HumanFeedback", "DriftingUser", "ErringUser"}
    for c in sources:
        assert FeedbackSource in c.__mro__, c
        assert all(hasattr(c, cap) for cap in CAPABILITIES), c


def test_a_person_offers_only_a_scale_and_an_erring_user_around_one_offers_nothing_more():
    person = HumanFeedback()
    assert person.scale == (1.0, 5.0)
    erring = ErringUser(person, 0.1)
    assert erring.scale == (1.0, 5.0)
    assert all(getattr(erring, c) is None for c in CAPABILITIES if c != "scale")


def test_an_erring_user_forwards_exactly_the_declared_capabilities():
    """Each declared capability is the true user's own object; what no source declares is not forwarded."""
    source = Oracle()
    erring = ErringUser(source, 0.2, seed=1)
    for c in CAPABILITIES:
        assert getattr(erring, c) == getattr(source, c), c
    assert erring.evaluate(_images(3)) == {"n": 3} and erring.probabilities(_images(2)).shape == (2, 10)
    assert erring.taste is source.taste and erring.classifier is source.classifier
    with pytest.raises(AttributeError):
        erring.mode  # noqa: B018 - the source's own attribute, not part of the contract
