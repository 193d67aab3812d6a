"""Training the oracle classifier: resumable runs, the held-out split, blends, the loss, the export."""

from __future__ import annotations

import csv

import pytest
import torch

from apa.feedback.classifier import load_oracle
from apa.training import oracle
from apa.training.common import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches: one thread is fastest


def test_training_resumes_where_it_stopped(tmp_path, mnist_arrays):
    def config(steps):
        return oracle.OracleRecipe(TrainConfig(steps=steps, batch_size=16, warmup=2, checkpoint_every=5, seed=3))

    oracle.train_oracle("mnist", tmp_path / "run", config(5), progress=False, limit=256, arrays=mnist_arrays)
    resumed = oracle.train_oracle("mnist", tmp_path / "run", config(8), progress=False, limit=256, arrays=mnist_arrays)
    with open(tmp_path / "run" / "loss.csv") as f:
        assert [int(row[0]) for row in csv.reader(f)] == list(range(1, 9))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 8
    straight = oracle.train_oracle("mnist", tmp_path / "straight", config(8), progress=False, limit=256, arrays=mnist_arrays)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_validation_split_is_seeded_disjoint_and_complete():
    fit, held = oracle.validation_split(100, 20)
    again, held_again = oracle.validation_split(100, 20)
    assert torch.equal(fit, again) and torch.equal(held, held_again)
    assert len(held) == 20 and sorted(fit.tolist() + held.tolist()) == list(range(100))
    with pytest.raises(ValueError, match="hold out"):
        oracle.validation_split(10, 10)


def test_mixed_blends_target_their_two_classes_below_the_confidence_bar(mnist_arrays):
    x = torch.from_numpy(mnist_arrays["train_images"][::40]).float().div(255).unsqueeze(1)  # every class
    y = torch.from_numpy(mnist_arrays["train_labels"][::40]).long()
    images, target = oracle.mixed_blends(x, y, 64, torch.Generator().manual_seed(0))
    assert images.shape == (64, 1, 28, 28) and target.shape == (64, 10)
    assert torch.allclose(target.sum(1), torch.ones(64))
    assert ((target > 0).sum(1) == 2).all() and target.max() <= oracle.BLEND_ALPHA[1] + 1e-6


def test_soft_loss_at_the_uniform_target_is_the_flat_loss():
    logits = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    flat = torch.logsumexp(logits, dim=1) - logits.mean(dim=1)  # CE against 1/C on every class; minimum log C
    assert torch.allclose(oracle.soft_cross_entropy(logits, torch.full((5, 10), 0.1)), flat)


def test_export_fits_the_temperature_on_held_out_images_and_ships_it(tmp_path, mnist_arrays):
    recipe = oracle.OracleRecipe(TrainConfig(steps=6, batch_size=16, warmup=2, checkpoint_every=3), validation=64,
                                 blend_target="mixed")
    oracle.train_oracle("mnist", tmp_path / "run", recipe, progress=False, limit=256, arrays=mnist_arrays)
    path, info = oracle.export_from_run("mnist", tmp_path / "run", tmp_path / "o.safetensors", arrays=mnist_arrays)
    assert info["train_images"] == 256 - 64 and info["blend_target"] == "mixed"
    assert info["validation_nll"] <= info["validation_nll_at_1"]
    model = load_oracle("mnist", path)
    assert model.config.temperature == pytest.approx(info["temperature"], abs=1e-4) and info["temperature"] != 1.0
