"""The judge: the shipped weights, accuracy on its own held-out images, refusal of non-classes, evaluate()."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from torch import nn

from apa import data
from apa.evaluation import judge as judge_mod
from apa.evaluation.judge import NONE, Judge, JudgeConfig, JudgeNet, judge_metadata, load_judge
from apa.training.judge import default_recipe, index_digest, judge_split, pool

# sha256 of the shipped files: a deliberate retraining updates these together with the model cards
SHIPPED_SHA256 = {
    "mnist": "e1483743fa9ae9edd1fbf7d783e64d5f33d374a4eaea645fc482ea3e8bc2bdc9",
    "fashion": "0019ec76b38591ed6d5aefc934286e1e7eceb4bd4fca46d228c83d94e6765528",
}
# what each judge is claimed to reach on its held-out images (the model cards report the measured values)
CLAIMED_ACCURACY = {"mnist": 0.97, "fashion": 0.85}

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches: one thread is fastest


@pytest.fixture(scope="module")
def fashion_arrays():
    return data.load("fashion")


def _held_out(dataset: str, arrays: dict) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The judge's held-out images [m, 1, 28, 28], labels [m] and pool indices, by its recipe's split."""
    recipe = default_recipe(dataset)
    images, labels = pool(arrays)
    idx = judge_split(labels, recipe.held_out_per_class, recipe.calibration_per_class, recipe.train_per_class,
                      recipe.split_seed)["held_out"]
    return torch.from_numpy(data.to_unit(images[idx])), torch.from_numpy(labels[idx]), idx


def _arrays(dataset, mnist_arrays, fashion_arrays):
    return mnist_arrays if dataset == "mnist" else fashion_arrays


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_shipped_weights_are_the_recorded_ones(dataset):
    path = judge_mod.weights_path(dataset)
    assert path.exists(), f"{path} is missing; run `apa train-judge --dataset {dataset}`"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHIPPED_SHA256[dataset]
    assert path.stat().st_size < 2_000_000
    meta = judge_metadata(dataset)
    assert meta["dataset"] == dataset and meta["judge"]["num_outputs"] == 11
    judge = load_judge(dataset)
    assert isinstance(judge.model, JudgeNet) and not judge.model.training
    assert judge.model.config.temperature == pytest.approx(meta["info"]["temperature"], abs=1e-4)


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_held_out_images_are_the_recorded_split_and_classified_accurately(dataset, mnist_arrays, fashion_arrays):
    x, y, idx = _held_out(dataset, _arrays(dataset, mnist_arrays, fashion_arrays))
    assert index_digest(idx) == judge_metadata(dataset)["info"]["split"]["held_out"]["sha256"]  # never trained on
    x, y = x[::3], y[::3]  # 500 (MNIST) / 1,000 (Fashion) images: a few seconds on one thread
    labels, _ = load_judge(dataset).classify(x)
    acc = (labels == y).float().mean().item()
    # were the accuracy as low as the claim p, an observed accuracy above p + 3σ (σ² = p(1 − p)/n)
    # would happen with probability < 0.2%; the test asks for at least p − 3σ, not to flake either way
    p, n = CLAIMED_ACCURACY[dataset], len(y)
    assert acc >= p - 3 * math.sqrt(p * (1 - p) / n), f"{dataset} judge accuracy {acc:.3f} on {n} held-out images"


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_judge_refuses_noise_blanks_and_the_other_dataset(dataset, mnist_arrays, fashion_arrays):
    judge = load_judge(dataset)
    gen = torch.Generator().manual_seed(7)
    probes = {"gaussian": (0.5 + 0.5 * torch.randn(200, 1, 28, 28, generator=gen)).clamp(0, 1),
              "uniform": torch.rand(200, 1, 28, 28, generator=gen),
              "blank": torch.linspace(0, 1, 200).view(-1, 1, 1, 1).expand(200, 1, 28, 28)}
    for name, x in probes.items():
        shares = judge.evaluate(x, range(10))
        assert shares["confident_share"] == 0.0, name
        assert shares["none_share"] >= 0.9, name
    other = _arrays("fashion" if dataset == "mnist" else "mnist", mnist_arrays, fashion_arrays)
    x = torch.from_numpy(data.to_unit(other["test_images"][::10][:200]))  # never trained on
    shares = judge.evaluate(x, range(10))
    assert shares["none_share"] >= 0.9 and shares["confident_share"] <= 0.05


def test_evaluate_on_real_digits_mixed_with_noise(mnist_arrays):
    x, y, _ = _held_out("mnist", mnist_arrays)
    ones, fours, sevens = x[y == 1][:30], x[y == 4][:10], x[y == 7][:20]
    noise = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    out = load_judge("mnist").evaluate(torch.cat([ones, fours, sevens, noise]), prefer=(4, 1))
    assert out["n"] == 100 and out["prefer"] == [1, 4]
    assert 0.37 <= out["preferred_confident_share"] <= out["preferred_share"] <= 0.41  # 40 of 100 are 1s and 4s
    assert 0.57 <= out["confident_share"] <= 0.60 and 0.40 <= out["none_share"] <= 0.43
    assert out["class_shares_preferred"][1] == pytest.approx(0.75, abs=0.03)  # 30 : 10
    assert out["min_class_share"] == out["class_shares_preferred"][4] == pytest.approx(0.25, abs=0.03)


class TableNet(nn.Module):
    """Logits log(row i) of a fixed table for an image whose first pixel is i / 100."""

    def __init__(self, rows: list[list[float]]):
        super().__init__()
        self.config = JudgeConfig()
        self.table = nn.Parameter(torch.tensor(rows).log(), requires_grad=False)

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 100).round().long()]


def _row(top: int, p: float) -> list[float]:
    """11 probabilities: ``p`` on output ``top``, the rest spread evenly."""
    return [p if k == top else (1 - p) / 10 for k in range(11)]


def test_evaluate_counts_a_hand_made_batch():
    rows = [_row(1, 0.95), _row(1, 0.97), _row(4, 0.92), _row(1, 0.5), _row(2, 0.99), _row(NONE, 0.9), _row(NONE, 0.4),
            _row(7, 0.95)]
    x = torch.zeros(len(rows), 1, 28, 28)
    x[:, 0, 0, 0] = torch.arange(len(rows)) / 100
    judge = Judge(TableNet(rows), "mnist")
    labels, conf = judge.classify(x)
    assert labels.tolist() == [1, 1, 4, 1, 2, NONE, NONE, 7]
    assert conf.tolist() == pytest.approx([0.95, 0.97, 0.92, 0.5, 0.99, 0.9, 0.4, 0.95], abs=1e-6)
    out = judge.evaluate(x, prefer=(1, 4, 9))
    assert out["preferred_confident_share"] == 3 / 8 and out["preferred_share"] == 4 / 8
    assert out["confident_share"] == 5 / 8 and out["none_share"] == 2 / 8
    assert out["class_shares_preferred"] == {1: round(2 / 3, 4), 4: round(1 / 3, 4), 9: 0.0}
    assert out["min_class_share"] == 0.0  # nobody drew a 9
    assert judge.evaluate(x, prefer=(1, 4))["min_class_share"] == round(1 / 3, 4)
    assert sum(out["class_shares"]) == pytest.approx(1.0)
    nothing = judge.evaluate(x[4:7], prefer=(1,))  # a 2 and two NONE: no preferred image at all
    assert nothing["preferred_confident_share"] == 0.0 and nothing["class_shares_preferred"] == {1: 0.0}
    assert nothing["min_class_share"] == 0.0


def test_bad_inputs_are_refused_with_the_reason(tmp_path):
    judge = Judge(TableNet([_row(1, 0.95)]), "mnist")
    with pytest.raises(ValueError, match=r"\[n, 1, 28, 28\]"):
        judge.classify(torch.zeros(2, 28, 28))
    with pytest.raises(ValueError, match="prefer must name classes"):
        judge.evaluate(torch.zeros(1, 1, 28, 28), prefer=(10,))
    with pytest.raises(FileNotFoundError, match="apa train-judge --dataset fashion"):
        load_judge("fashion", tmp_path / "absent.safetensors")
