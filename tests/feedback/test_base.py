"""Feedback sources: the answer checks and the simulated user who errs (--label-noise)."""

import pytest
import torch

from apa.feedback.base import ErringUser, FeedbackError, check_scores, with_label_noise


class Liker:
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
    class Graded:
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
