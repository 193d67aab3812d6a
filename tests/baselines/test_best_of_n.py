"""Best-of-N: the best-rated images are what the sampler refines around."""

import torch

from apa.baselines.best_of_n import BestOfNConfig, best_indices, refine, run

from .conftest import AlternatingUser, assert_images


def test_best_indices_keep_ties_or_the_top_m():
    s = torch.tensor([-1.0, 1.0, 0.5, 1.0])
    assert best_indices(s, None).tolist() == [1, 3]
    assert best_indices(s, 3).tolist() == [1, 3, 2]


def test_refine_without_noise_returns_the_images_and_with_noise_stays_in_range(tiny_prior):
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(refine(tiny_prior, x, 0, 5, torch.Generator()), x)
    assert_images(refine(tiny_prior, x, 300, 5, torch.Generator().manual_seed(0)), 3)


def test_best_of_n_returns_only_best_rated_images_without_refinement(tiny_prior):
    cfg = BestOfNConfig(steps=3, refine_t=0)
    res = run(tiny_prior, AlternatingUser(), 6, 2, 0, config=cfg, checkpoints=(2, 6), eval_samples=5)
    assert [r.spent for r in res.records] == [2, 4, 6] and res.oracle_ratings == 6
    liked = torch.cat([r.images[0:1] for r in res.records])  # the alternating user likes each round's first
    for img in res.checkpoints[6]:
        assert any(torch.equal(img, l) for l in liked)
    assert all(torch.equal(img, res.records[0].images[0]) for img in res.checkpoints[2])
    assert res.info["best_count"] == 3


def test_best_of_n_with_refinement_has_the_right_shape(tiny_prior, user):
    res = run(tiny_prior, user, 4, 2, 1, config=BestOfNConfig(steps=3, refine_t=300), checkpoints=(4,),
              eval_samples=4)
    assert_images(res.checkpoints[4], 4)
    assert_images(res.sample(2, torch.Generator().manual_seed(0)), 2)
