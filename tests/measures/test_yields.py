"""Yield: distinct, new, liked images of a batch; each test names the mistake it would catch."""

import torch

from apa.measures.yields import distinct_mask, duplicate_threshold, new_mask, take_home


def points(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, d, generator=torch.Generator().manual_seed(seed))


def test_exact_repeats_count_once_and_independent_samples_are_nearly_all_distinct():
    x = points(200)
    thr = duplicate_threshold(points(200, seed=1))
    # independent samples from the yardstick's law: about DUPLICATE_QUANTILE of them repeat another
    # (1% of 200 = 2 expected; 8 or more would be a threshold read on the wrong side)
    assert distinct_mask(x, thr).sum() >= 192
    batch = torch.cat([x[:50], x[:50], x[:50]])  # a batch resampled with replacement
    assert int(distinct_mask(batch, thr).sum()) == int(distinct_mask(x[:50], thr).sum())


def test_the_first_of_a_pair_is_kept_and_a_threshold_of_zero_still_merges_exact_copies():
    x = torch.tensor([[[0.0]], [[0.0]], [[3.0]]])
    assert distinct_mask(x, 0.0).tolist() == [True, False, True]
    assert distinct_mask(x, 5.0).tolist() == [True, False, False]


def test_new_excludes_near_copies_of_rated_images_by_the_prior_yardstick():
    prior = points(400, seed=2)
    rated = points(10, seed=3)
    copies = rated + 1e-3
    fresh = points(100, seed=4)
    assert not new_mask(copies, rated, prior).any()
    assert new_mask(fresh, rated, prior).float().mean() > 0.85  # 5% by construction; 15% would be a wrong side


def test_yield_counts_liked_new_distinct_images_and_per_call_rates():
    prior, rated = points(300, seed=5), points(5, seed=6)
    fresh = points(20, seed=7)
    batch = torch.cat([fresh, fresh[:5], rated[:3] + 1e-4])  # 20 new, 5 repeats, 3 copies of rated images
    liked = torch.ones(28, dtype=torch.bool)
    liked[:4] = liked[20:24] = False  # 4 of the new ones (and their repeats) not liked
    home = take_home(batch, liked, rated, prior, calls=4000, seconds=2.0)
    assert home["distinct"] == 23 and home["yield"] == 16 and home["new_liked"] == 16 + 1  # + fresh[4]'s repeat
    assert home["yield_per_kcall"] == 4.0 and home["yield_per_s"] == 8.0
