"""Closed-form checks of the evaluation metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from apa.measures.metrics import coverage_entropy, frechet_distance, mean_pairwise_distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    x = np.random.default_rng(0).normal(size=(500, 8))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_of_two_gaussians_matches_closed_form():
    # diagonal covariances: FD = |μa − μb|² + Σ (√a_i − √b_i)²
    rng = np.random.default_rng(1)
    var_a, var_b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 0.25])
    mu_a, mu_b = np.array([0.0, 1.0, -1.0]), np.array([1.0, 1.0, 1.0])
    a = mu_a + np.sqrt(var_a) * rng.normal(size=(200_000, 3))
    b = mu_b + np.sqrt(var_b) * rng.normal(size=(200_000, 3))
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.02)


def test_frechet_distance_agrees_with_scipy_sqrtm_on_full_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5))
    b = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 0.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(torch.from_numpy(a), b) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_refuses_mismatched_widths():
    with pytest.raises(ValueError, match="widths"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


def test_mean_pairwise_distance_closed_form():
    # corners of a unit square: 4 sides of length 1, 2 diagonals of length √2
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_distance(x) == pytest.approx((4 + 2 * np.sqrt(2)) / 6)
    assert mean_pairwise_distance(np.ones((5, 3))) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        mean_pairwise_distance(np.zeros((1, 3)))


def test_coverage_entropy():
    counts = [5, 10, 0, 0, 10, 0, 0, 10, 0, 10]
    assert coverage_entropy(counts, [1, 4, 7, 9]) == pytest.approx(1.0)  # uniform over the preferred
    assert coverage_entropy(counts, [1, 2]) == pytest.approx(0.0)  # all in one class
    assert coverage_entropy([0] * 10, [1, 4]) == 0.0  # nothing at all
    assert coverage_entropy(counts, [1]) == 1.0
    # two classes at 3:1 -> H = -(¾ln¾ + ¼ln¼)/ln 2
    two = [0, 3, 1] + [0] * 7
    assert coverage_entropy(torch.tensor(two), [1, 2]) == pytest.approx(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)) / np.log(2))
    with pytest.raises(ValueError):
        coverage_entropy(counts, [10])
