"""Training the judge: its split, the loss over 11 outputs, resuming, the calibrated export."""

from __future__ import annotations

import csv
from dataclasses import replace

import numpy as np
import pytest
import torch

from apa.training import judge as jt
from apa.evaluation.judge import NONE, JudgeConfig, load_judge
from apa.training.common import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches: one thread is fastest


def test_judge_split_is_seeded_disjoint_and_per_class():
    labels = np.repeat(np.arange(10), 30)
    parts = jt.judge_split(labels, held_out=5, calibration=3, train=None, seed=1)
    again = jt.judge_split(labels, held_out=5, calibration=3, train=None, seed=1)
    assert all(np.array_equal(parts[k], again[k]) for k in parts)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(300))  # disjoint, complete
    for name, per_class in (("held_out", 5), ("calibration", 3), ("train", 22)):
        assert np.bincount(labels[parts[name]], minlength=10).tolist() == [per_class] * 10
    other_seed = jt.judge_split(labels, held_out=5, calibration=3, seed=2)["held_out"]
    assert not np.array_equal(other_seed, parts["held_out"])
    assert len(jt.judge_split(labels, 5, 3, train=10)["train"]) == 100
    with pytest.raises(ValueError, match="too few"):
        jt.judge_split(labels, held_out=20, calibration=10)


def test_other_split_is_disjoint():
    o = jt.other_split(100, train=60, calibration=20)
    assert len(o["train"]) == 60 and len(o["calibration"]) == 20 and not np.isin(o["train"], o["calibration"]).any()
    with pytest.raises(ValueError, match="cannot take"):
        jt.other_split(10, 8, 5)


def test_the_split_record_counts_the_oracles_images(mnist_arrays):
    r = jt.default_recipe("mnist")
    # the MNIST oracle trains on every train image (pool indices below 9,000) and on no test image
    assert np.array_equal(jt.oracle_training_indices("mnist", 9000), np.arange(9000))
    d = jt.judge_data("mnist", replace(r, other_train=10, other_calibration=10), arrays=mnist_arrays,
                      other=mnist_arrays)  # the other dataset's images do not matter here
    _, labels = jt.pool(mnist_arrays)
    held = jt.judge_split(labels, r.held_out_per_class, r.calibration_per_class, r.train_per_class,
                          r.split_seed)["held_out"]
    assert d.split["held_out"]["count"] == len(held) == 1500
    assert torch.equal(d.held_out_oracle_unseen, torch.from_numpy(held >= 9000))
    assert d.split["oracle_overlap"]["held_out_in_oracle_train"] == int((held < 9000).sum())
    assert 0 < d.split["oracle_overlap"]["train_in_oracle_train"] < d.split["train"]["count"]


def _tiny(mnist_arrays) -> jt.JudgeData:
    """A few hundred real digits and random 'other' images: enough to exercise training and export."""
    x = torch.from_numpy(mnist_arrays["train_images"][:400]).float().div(255).unsqueeze(1)
    y = torch.from_numpy(mnist_arrays["train_labels"][:400]).long()
    other = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    return jt.JudgeData((x[:300], y[:300]), (x[300:350], y[300:350]), (x[350:], y[350:]), other, other[:16],
                        other[16:], {"note": "tiny"})


def _recipe(steps: int) -> jt.JudgeRecipe:
    return jt.JudgeRecipe(TrainConfig(steps=steps, batch_size=16, warmup=2, checkpoint_every=3, seed=3),
                          JudgeConfig(channels=(8, 8, 8), groups=4), other_per_step=4, synthetic_per_step=4)


def test_loss_is_cross_entropy_over_eleven_outputs(mnist_arrays):
    d = _tiny(mnist_arrays)
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, generator=None):
            seen["n"], seen["generator"] = len(x), generator
            return torch.zeros(len(x), 11) + self.w

    gen = torch.Generator().manual_seed(0)
    loss = jt.judge_loss(*d.train, d.other_train, 16, 4, 4)(Spy(), gen)
    assert seen["n"] == 24 and seen["generator"] is gen  # dropout draws from the loop's generator and loss.item() == pytest.approx(np.log(11), rel=1e-5)  # uniform logits


def test_training_resumes_and_export_fits_a_temperature(tmp_path, mnist_arrays):
    d = _tiny(mnist_arrays)
    jt.train_judge("mnist", tmp_path / "run", _recipe(4), progress=False, prepared=d)
    resumed = jt.train_judge("mnist", tmp_path / "run", _recipe(6), progress=False, prepared=d)
    with open(tmp_path / "run" / "loss.csv") as f:
        assert [int(row[0]) for row in csv.reader(f)] == list(range(1, 7))
    straight = jt.train_judge("mnist", tmp_path / "straight", _recipe(6), progress=False, prepared=d)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    path, info = jt.export_from_run("mnist", tmp_path / "run", tmp_path / "j.safetensors", prepared=d,
                                    compare_oracle=False)
    assert info["steps"] == 6 and info["split"] == {"note": "tiny"} and info["calibration_images"] == 50 + 32
    assert info["calibration_nll"] <= info["calibration_nll_at_1"]
    judge = load_judge("mnist", path)
    assert judge.model.config.temperature == pytest.approx(info["temperature"], abs=1e-4)
    labels, conf = judge.classify(d.held_out[0])
    assert labels.shape == conf.shape == (50,) and ((labels >= 0) & (labels <= NONE)).all()


def test_expected_calibration_error_is_zero_when_confidence_is_accuracy():
    # confidence 0.75 on every row, and three of four top guesses right
    probs = torch.tensor([[0.75, 0.25]] * 4)
    assert jt.expected_calibration_error(probs, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0)
    assert jt.expected_calibration_error(probs, torch.tensor([1, 1, 1, 1])) == pytest.approx(0.75)
