"""Resamplers are unbiased: the average number of copies of particle i over many draws is M·w_i."""

import math

import numpy as np

import pytest
import torch

from apa.smc import resampling

SCHEMES = list(resampling.RESAMPLERS)


def _counts(scheme, log_w, m, reps, seed=0):
    g = torch.Generator().manual_seed(seed)
    fn = resampling.get_resampler(scheme)
    total = torch.zeros(log_w.shape[0], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for _ in range(reps):
        c = torch.bincount(fn(g, log_w, m), minlength=log_w.shape[0]).double()
        total += c
        sq += c**2
    mean = total / reps
    var = sq / reps - mean**2
    return mean, var


@pytest.mark.parametrize("scheme", SCHEMES)
def test_unbiased(scheme):
    g = torch.Generator().manual_seed(1)
    w = torch.rand(12, generator=g, dtype=torch.float64) ** 3
    log_w = torch.log(w)
    p = w / w.sum()
    m, reps = 12, 2000
    mean, var = _counts(scheme, log_w, m, reps)
    # the standard error of a mean of `reps` counts; multinomial variance bounds the others' from above
    se = torch.sqrt(torch.clamp(var, min=m * p * (1 - p) / 50) / reps)
    z = (mean - m * p) / se
    assert z.abs().max() < 4.5, (scheme, z)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_shape_and_range(scheme):
    g = torch.Generator().manual_seed(0)
    idx = resampling.get_resampler(scheme)(g, torch.randn(9, dtype=torch.float64), 25)
    assert idx.shape == (25,) and idx.dtype == torch.int64
    assert int(idx.min()) >= 0 and int(idx.max()) < 9


@pytest.mark.parametrize("scheme", SCHEMES)
def test_single_nonzero_weight(scheme):
    lw = torch.full((8,), -math.inf, dtype=torch.float64)
    lw[5] = 2.0
    idx = resampling.get_resampler(scheme)(torch.Generator().manual_seed(0), lw, 8)
    assert (idx == 5).all()


@pytest.mark.parametrize("scheme", ["systematic", "stratified", "residual"])
def test_equal_weights_keep_everyone(scheme):
    idx = resampling.get_resampler(scheme)(torch.Generator().manual_seed(0), torch.zeros(16, dtype=torch.float64), 16)
    assert sorted(idx.tolist()) == list(range(16))


def test_float32_cumsum_ending_below_one_cannot_overflow():
    # float32 weights normalised in float32 whose float32 cumulative sum ends below 1
    w = np.random.default_rng(1).random(1000).astype(np.float32)
    w32 = (w / w.sum()).astype(np.float32)
    cdf32 = torch.from_numpy(np.cumsum(w32, dtype=np.float32)).double()
    assert float(cdf32[-1]) < 1.0
    u = torch.tensor([(float(cdf32[-1]) + 1.0) / 2.0], dtype=torch.float64)  # beyond the float32 end
    assert int(resampling._search(cdf32, u)) == 999  # clamped to the last particle, never 1000
    # the resamplers themselves build their cdf in float64 with its end pinned to 1
    assert float(resampling._cdf(torch.from_numpy(np.log(w32)))[-1]) == 1.0
    for scheme in SCHEMES:
        idx = resampling.get_resampler(scheme)(torch.Generator().manual_seed(0), torch.from_numpy(np.log(w32)), 1000)
        assert int(idx.max()) <= 999


def test_ess_threshold_decision():
    equal = torch.zeros(10, dtype=torch.float64)
    skewed = torch.tensor([0.0] + [-30.0] * 9, dtype=torch.float64)
    assert not resampling.ess_threshold(equal, 0.5)
    assert resampling.ess_threshold(skewed, 0.5)
    assert not resampling.ess_threshold(skewed, 0.0)


def test_unknown_scheme():
    with pytest.raises(ValueError, match="systematic"):
        resampling.get_resampler("bogus")
