"""Fixtures for the web tests: a tiny random DDPM prior, tiny session settings, an app, a live server.

Every session here is small (8 particles, 5 steps, 4 images a round, a budget of 8, 10 epochs), so a
round takes about a second; the prior is a randomly initialised UNet written to a temporary file,
so the tests need neither trained weights nor a network.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from apa.config import AlignConfig
from apa.session import with_overrides
from tests.web.helpers import TINY, LiveServer


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A randomly initialised (seeded) DDPM in the shipped file format."""
    from apa.priors.ddpm import export_prior
    from apa.priors.unet import UNet, UNetConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = UNet(UNetConfig(channels=(8, 8, 8), time_dim=16, groups=8))
    return export_prior(model, tmp_path_factory.mktemp("prior") / "tiny_ddpm.safetensors", "mnist", 0.6, {})


@pytest.fixture
def tiny_cfg(tiny_weights) -> AlignConfig:
    return with_overrides(AlignConfig(), prior={"weights": str(tiny_weights)}, **TINY)


@pytest.fixture
def make_manager(tmp_path, tiny_cfg):
    """``make_manager(data_dir=None, **kwargs)``: SessionManagers that are closed after the test."""
    from apa.web.sessions import SessionManager

    made = []

    def make(data_dir: Path | None = None, **kwargs):
        kwargs.setdefault("fixed_seed", True)
        m = SessionManager(data_dir or tmp_path / "data", tiny_cfg, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()


@pytest.fixture
def manager(make_manager):
    return make_manager()


@pytest.fixture
def client(manager):
    from fastapi.testclient import TestClient

    from apa.web.server import create_app

    with TestClient(create_app(manager)) as c:
        yield c


@pytest.fixture
def live_server(manager):
    from apa.web.server import create_app

    with LiveServer(create_app(manager)) as server:
        yield server
