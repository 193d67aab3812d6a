"""The shared training loop: a resumed run is the uninterrupted one, step for step, and a checkpoint reads back."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from apa.training.common import TrainConfig, load_checkpoint_model, train

pytestmark = pytest.mark.usefixtures("one_thread")  # a 4-parameter model: one thread is fastest

CONFIG = TrainConfig(steps=8, batch_size=4, lr=0.05, warmup=2, checkpoint_every=3, seed=5)


def _loss(model: nn.Module, gen: torch.Generator) -> torch.Tensor:
    """Least squares on a batch drawn with the loop's generator: y = 2·x1 − x2 + 0.5 + noise."""
    x = torch.randn(CONFIG.batch_size, 3, generator=gen)
    y = 2 * x[:, 0] - x[:, 1] + 0.5 + 0.1 * torch.randn(CONFIG.batch_size, generator=gen)
    return (model(x).squeeze(1) - y).pow(2).mean()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path):
    straight = train(_model(), _loss, CONFIG, tmp_path / "straight", progress=False)
    train(_model(), _loss, replace(CONFIG, steps=5), tmp_path / "resumed", progress=False)
    resumed = train(_model(), _loss, CONFIG, tmp_path / "resumed", progress=False)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    rows = (tmp_path / "resumed" / "loss.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 9))
    loaded, info = load_checkpoint_model(_model(), tmp_path / "resumed")
    assert info["step"] == 8
    assert torch.equal(loaded.weight, straight.weight)
