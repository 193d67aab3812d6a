"""A session started from images the user already likes (``--examples``): what the user gives, how
round 0 stores it, and what is refused."""

import pytest
import torch

from apa.cli import main
from apa.config import preset
from apa.measures.novelty import users_liked
from apa.session import components, with_overrides
from apa.session.examples import ExamplesError, examples_round, liked_examples
from apa.store import SessionStore

TINY = ["--budget", "10", "--per-round", "4", "--particles", "8", "--steps", "6", "--eval-samples", "8",
        "--epochs", "10", "--seed", "3"]


def _user(**feedback):
    cfg = with_overrides(preset("default"), feedback=feedback)
    return components.build(cfg)


def test_a_simulated_user_gives_real_images_it_likes_and_never_a_like_tastes_own():
    """Every given image is liked by the user (a class set, and a like-these taste, whose defining
    held-out images are never among them); the seed sets which ones, and the same seed the same."""
    prior, user = _user(prefer=(3,))
    given = liked_examples(user, "mnist", 5, seed=0)
    assert given.shape == (5, 1, 28, 28) and bool(users_liked(user, given).all())
    assert torch.equal(given, liked_examples(user, "mnist", 5, seed=0))
    assert not torch.equal(given, liked_examples(user, "mnist", 5, seed=1))
    _, like = _user(taste="like:400,437,468")
    from apa.feedback.tastes import example_images

    own = example_images("mnist", [400, 437, 468]).flatten(1)
    picked = liked_examples(like, "mnist", 4, seed=0).flatten(1)
    assert bool(users_liked(like, picked.view(-1, 1, 28, 28)).all())
    assert torch.cdist(picked, own).min() > 0  # none of the three that define the taste


def test_round_zero_holds_the_examples_each_rated_liked_and_counted_in_the_budget(tmp_path):
    """The stored round 0 decodes to the given images, each rated at the top of the scale by source
    "given"; the session then runs its rounds to the budget (10 = 2 given + 4 + 4) and its final batch."""
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), "--prefer", "3", "--examples", "2", *TINY]) == 0
    store = SessionStore.read(out)
    ratings = store.ratings(0)
    assert [(x["score"], x["source"]) for x in ratings] == [(1.0, "given")] * 2
    prior, user = _user(prefer=(3,))
    shown = store.round_tensors(0)["particles"]
    assert torch.allclose(prior.decode(shown), liked_examples(user, "mnist", 2, seed=3), atol=1e-6)
    assert store.rounds()[0]["info"]["given"] == 2
    assert store.spent() == 10 and len(store.rounds()) == 3 and (out / "final_samples.npz").exists()


def test_a_prior_that_cannot_take_images_and_too_many_examples_are_refused(tmp_path, capsys):
    """The Gaussian mixture has no ``encode``: refused with a line that says to drop --examples; more
    examples than the budget is refused before anything is written."""
    from apa.registry import PRIORS

    prior = PRIORS.create("gmm", {"name": "gmm"})
    with pytest.raises(ExamplesError, match="drop --examples"):
        examples_round(prior, torch.zeros(2, 2))
    out = tmp_path / "s"
    assert main(["align", "--out", str(out), "--prefer", "3", "--examples", "11", *TINY]) == 2
    assert "--examples" in capsys.readouterr().err and not out.exists()


def test_a_given_image_too_large_to_decode_is_refused_from_its_header():
    """A 5,000 × 4,000 PNG (20 megapixels; a few kilobytes compressed) is refused by its size before its
    pixels are decoded; a small one of another mode is converted to the prior's grey 28 × 28."""
    import io

    import pytest
    from PIL import Image

    from apa.session.examples import ExamplesError, read_given

    class Shape:
        name, event_shape, encode = "tiny", (1, 28, 28), staticmethod(lambda x: x)

    big, small = io.BytesIO(), io.BytesIO()
    Image.new("L", (5000, 4000)).save(big, format="PNG")
    Image.new("RGB", (40, 30), (255, 0, 0)).save(small, format="JPEG")
    with pytest.raises(ExamplesError, match="5000×4000"):
        read_given([small.getvalue(), big.getvalue()], Shape())
    out = read_given([small.getvalue()], Shape())
    assert out.shape == (1, 1, 28, 28) and abs(float(out.mean()) - 0.299) < 0.02  # red's luma
