"""Tastes no class names: pixel measures, thresholds set on the prior's samples, the views that score them."""

import pytest
import torch

from apa.feedback.tastes import Taste, TasteSpec, View, ink_moments, parse_taste, style_measure


def bar(width: int, shear: float = 0.0, height: int = 16) -> torch.Tensor:
    """A vertical stroke [1, 1, 28, 28]: ``width`` pixels wide, leaning right by ``shear`` px per row up."""
    img = torch.zeros(1, 1, 28, 28)
    for row in range(6, 6 + height):
        x0 = round(12 + shear * (21 - row))
        img[0, 0, row, x0:x0 + width] = 1.0
    return img


def test_measures_rank_strokes_as_a_person_would():
    thin, thick = bar(1), bar(4)
    right, left = bar(2, shear=0.5), bar(2, shear=-0.5)
    small, large = bar(2, height=6), bar(2, height=20)
    assert style_measure(thick, "thick") > style_measure(thin, "thick")
    assert style_measure(thin, "thin") > style_measure(thick, "thin")
    assert ink_moments(right)["slant"] > 0.3 > -0.3 > ink_moments(left)["slant"]  # shear 0.5 px/row ≈ slant 0.5
    assert abs(float(ink_moments(bar(2))["slant"])) < 1e-9
    assert style_measure(large, "large") > style_measure(small, "large")


def fake_view(classes: torch.Tensor) -> View:
    """A view that puts image i in class classes[i] with certainty; features are the pixels."""
    def probabilities(x: torch.Tensor) -> torch.Tensor:
        cls = x.reshape(x.shape[0], -1)[:, 0].round().long()  # the class is written in pixel 0
        return torch.nn.functional.one_hot(cls, 10).float()
    return View(probabilities, lambda x: x.reshape(x.shape[0], -1), 0.9)


def pool_of(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.5
    x[:, 0, 0, 0] = torch.randint(0, 10, (n,), generator=g).float()
    return x


def test_a_style_taste_holds_its_share_of_the_pool_and_only_within_its_class():
    pool = pool_of(1000)
    taste = Taste.fit(TasteSpec("style", cls=3, measure="thick", share=0.02), fake_view(None), pool)
    liked = taste.liked(pool)
    assert int(liked.sum()) == 20  # ⌈share·M⌉ exactly: continuous measures have no ties
    assert (pool[liked][:, 0, 0, 0] == 3).all()
    fresh = pool_of(4000, seed=1)
    # the share on fresh samples of the same law: binomial(4000, 0.02) has sd 8.9; off by 4 sd would be a wrong quantile
    assert abs(int(taste.liked(fresh).sum()) - 80) < 36


def test_a_like_these_taste_prefers_images_near_its_examples():
    pool = pool_of(500)
    examples = pool_of(2, seed=9)
    taste = Taste.fit(TasteSpec("like", examples=(0, 1), share=0.05), fake_view(None), pool, examples)
    assert taste.liked(examples).all() and int(taste.liked(pool).sum()) == 25


@pytest.mark.parametrize("text", ["style:7", "style:7:bold", "like:", "like:1,1", "like:a", "colour:red"])
def test_bad_tastes_are_refused_with_the_form(text):
    with pytest.raises(ValueError, match="style:CLASS:MEASURE"):
        parse_taste(text)


def test_tastes_parse_by_number_and_name():
    assert parse_taste("style:sneaker:thin", 0.03, ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                     "Shirt", "Sneaker", "Bag", "Ankle boot")) == \
        TasteSpec("style", cls=7, measure="thin", share=0.03)
    assert parse_taste("like:3,17").examples == (3, 17)


def test_align_with_a_taste_no_class_names_rates_by_it_and_reports_its_share(tmp_path, monkeypatch, capsys):
    """`apa align --taste style:1:thick`: the simulated user likes thick ones only, set on the prior's own
    samples (a small pool here), and the report's share is the taste's, not the class's."""
    import json

    from apa.cli import main

    monkeypatch.setenv("APA_DATA", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    assert main(["align", "--out", str(tmp_path / "s"), "--taste", "style:1:thick", "--taste-share", "0.05",
                 "--taste-pool", "64", "--budget", "8", "--per-round", "4", "--particles", "8", "--steps", "6",
                 "--eval-samples", "8", "--epochs", "5", "--json"]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["final"]["taste"] == "style:1:thick@0.05"
    assert report["final"]["taste_prior_share"] == pytest.approx(3 / 64)  # round(0.05·64) of the pool
    assert list((tmp_path / "data" / "baselines").glob("pool_*_25_64.safetensors"))  # drawn once, cached
    capsys.readouterr()
    assert main(["align", "--out", str(tmp_path / "t"), "--taste", "style:1:bold"]) == 2
    assert "--taste must be style:CLASS:MEASURE" in capsys.readouterr().err
