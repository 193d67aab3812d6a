import math

import pytest
import torch

from apa.smc import weights


def test_normalize_and_ess_equal_weights():
    lw = torch.zeros(10, dtype=torch.float64)
    assert torch.allclose(weights.normalize(lw), torch.full((10,), -math.log(10), dtype=torch.float64))
    assert weights.ess(lw) == pytest.approx(10.0)


def test_single_nonzero_weight_has_ess_one():
    lw = torch.full((7,), -math.inf, dtype=torch.float64)
    lw[3] = 0.0
    assert weights.ess(lw) == pytest.approx(1.0)
    p = weights.probabilities(lw)
    assert p[3] == 1.0 and p.sum() == 1.0


def test_shift_invariance_and_huge_values():
    lw = torch.tensor([1000.0, 1001.0, 999.0], dtype=torch.float64)
    p = weights.probabilities(lw)
    q = weights.probabilities(lw - 1000.0)
    assert torch.allclose(p, q)
    assert torch.isfinite(p).all()


def test_all_minus_inf_raises():
    with pytest.raises(FloatingPointError, match="zero weight"):
        weights.normalize(torch.full((4,), -math.inf))


def test_log_mean_exp():
    lw = torch.log(torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64))
    assert weights.log_mean_exp(lw) == pytest.approx(math.log(3.0))
