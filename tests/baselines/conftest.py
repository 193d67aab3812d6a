"""A tiny randomly-initialised DDPM prior and the shipped MNIST oracle user, for fast baseline tests."""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from apa.feedback.base import FeedbackSource
from apa.feedback.classifier import load_oracle
from apa.feedback.oracle import OracleUser
from apa.priors.ddpm import DDPMPrior
from apa.priors.unet import UNet, UNetConfig

TINY_UNET = UNetConfig(channels=(8, 8, 8), time_dim=16, groups=4)


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread: these tests share two cores with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(TINY_UNET)


@pytest.fixture
def tiny_prior() -> DDPMPrior:
    return DDPMPrior(tiny_unet(), data_std=0.6, name="mnist")


@pytest.fixture(scope="session")
def user() -> OracleUser:
    return OracleUser(load_oracle("mnist"), "1,4,7,9")


class AlternatingUser(FeedbackSource):
    """Rates images +1, -1, +1, ... in the order it sees them (a user whose answers a test can predict)."""

    name = "alternating"

    def __init__(self):
        self.seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        k = images.shape[0]
        scores = torch.tensor([1.0 if (self.seen + i) % 2 == 0 else -1.0 for i in range(k)])
        self.seen += k
        return scores


def assert_images(images: torch.Tensor, n: int) -> None:
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert torch.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


# ---------------------------------------------------------------- closed-form checks on the Gaussian mixture

A = torch.tensor([0.8, 0.5])  # a linear reward r(z) = z·A on the 2-D mixture prior
SEEDS = 12  # independent runs whose mean a test compares
LEVEL = 1e-3  # family-wise false-alarm rate of a test's comparisons


def critical(num_stats: int, df: int) -> float:
    """The two-sided t quantile for num_stats comparisons at family-wise LEVEL (Bonferroni)."""
    return float(stats.t.ppf(1 - LEVEL / (2 * num_stats), df=df))


def mixture_shares(target, particles: torch.Tensor, log_w: torch.Tensor) -> torch.Tensor:
    """Weighted mean of the target mixture's component responsibilities at σ = 0: [K]."""
    w = torch.exp(log_w.double().flatten() - torch.logsumexp(log_w.double().flatten(), 0))
    return (w[:, None] * target.responsibilities(particles, 0.0).double()).sum(0)
