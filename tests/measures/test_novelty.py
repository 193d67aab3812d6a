import math

import pytest
import torch

from apa.measures.metrics import NEAR_COPY_QUANTILE, nearest_distance
from apa.measures.novelty import (class_mix, effective_sample_size, near_copies,
                                    total_variation)


def test_nearest_distance_is_the_minimum_over_the_reference():
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert torch.allclose(nearest_distance(torch.tensor([[3.0, 3.0], [0.0, 1.0]]), ref).float(),
                          torch.tensor([1.0, 1.0]))


def test_copies_of_liked_images_are_near_copies_and_independent_samples_are_not():
    """Copies (plus a little noise) score 1 with a distance ratio near 0; fresh draws from the prior's own
    law score the quantile within binomial error (4 standard errors: a threshold or a comparison taken the
    wrong way round fails), with a ratio near 1."""
    g = torch.Generator().manual_seed(0)
    liked = torch.randn(40, 1, 8, 8, generator=g)
    prior = torch.randn(4000, 1, 8, 8, generator=g)
    copies = liked[torch.randint(0, 40, (300,), generator=g)] + 0.01 * torch.randn(300, 1, 8, 8, generator=g)
    out = near_copies(copies, liked, prior)
    assert out["near_copy_share"] == 1.0 and out["distance_ratio"] < 0.01
    fresh = torch.randn(4000, 1, 8, 8, generator=g)
    out = near_copies(fresh, liked, prior)
    se = math.sqrt(NEAR_COPY_QUANTILE * (1 - NEAR_COPY_QUANTILE) / 4000) * math.sqrt(2)  # both sets sampled
    assert abs(out["near_copy_share"] - NEAR_COPY_QUANTILE) < 4 * se
    assert abs(out["distance_ratio"] - 1.0) < 0.02


def test_near_copies_are_undefined_without_images():
    out = near_copies(torch.zeros(0, 4), torch.ones(3, 4), torch.ones(5, 4))
    assert math.isnan(out["near_copy_share"]) and math.isnan(out["distance_ratio"])


def test_class_mix_total_variation_and_ess():
    labels = torch.tensor([0, 0, 1, 2])
    assert torch.allclose(class_mix(labels, 4), torch.tensor([0.5, 0.25, 0.25, 0.0], dtype=torch.float64))
    log_w = torch.tensor([0.0, 0.0, math.log(2.0), -math.inf])  # weights 1, 1, 2, 0
    assert torch.allclose(class_mix(labels, 4, log_w), torch.tensor([0.5, 0.5, 0.0, 0.0], dtype=torch.float64))
    assert total_variation(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(1.0)
    assert total_variation(class_mix(labels, 4), class_mix(labels, 4, log_w)) == pytest.approx(0.25)
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10.0)
    assert effective_sample_size(log_w) == pytest.approx(16 / 6)


def test_reweighted_mix_of_many_draws_matches_the_tilted_law():
    """Importance reweighting (the fidelity reference) recovers a tilted categorical within Monte Carlo error."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([0.6, 0.3, 0.1])
    r = torch.tensor([0.0, 1.0, 2.0])
    labels = torch.multinomial(p, 20000, replacement=True, generator=g)
    mix = class_mix(labels, 3, r[labels])
    target = p * r.exp() / (p * r.exp()).sum()
    assert total_variation(mix, target) < 0.02


def test_the_built_in_priors_ship_their_reference_samples_and_a_report_draws_none(tmp_path, monkeypatch):
    """The first report on a machine reads the 512 shipped samples instead of drawing them (12,800 ε rows
    a first session spent); each shipped file is named by, and records, the digest of the weights it
    was drawn from, so a retrained prior never reads another's."""
    from safetensors import safe_open

    from apa.data import file_sha256
    from apa.measures import novelty
    from apa.priors.ddpm import weights_path
    from apa.shipped import shipped_path

    monkeypatch.setenv("APA_DATA", str(tmp_path))
    monkeypatch.setattr(novelty, "draw_reference", lambda *a, **k: (_ for _ in ()).throw(AssertionError("drawn")))
    for dataset in ("mnist", "fashion"):
        sha = file_sha256(weights_path(dataset))
        path = shipped_path(novelty.reference_name(sha, 25, 512))
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["prior_sha256"] == sha
        z = novelty.prior_reference(None, sha, 25, tmp_path / "baselines")
        assert z.shape == (512, 1, 28, 28) and z.abs().max() < 3  # clean particles, in data units
    assert not list(tmp_path.rglob("reference_*"))  # nothing drawn, nothing cached
