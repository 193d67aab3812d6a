"""The oracle classifier (shipped weights, training) and the simulated user built on it."""

from __future__ import annotations

import csv
import hashlib
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from apa.feedback import oracle
from apa.feedback.oracle import Classifier, OracleUser, load_oracle, train_oracle, union
from apa.registry import FEEDBACK
from apa.training import TrainConfig

# sha256 of the shipped files: a deliberate retraining updates these together with the model cards
SHIPPED_SHA256 = {
    "mnist": "edbf69b225c56616d042e8974a08ad644fac06730ad75ac17268c1d880dca283",
    "fashion": "ea72ec8d7f6ea8a1c1fc5a05b7be5f32b88da3cf7ce121a7e357a8d55b56adad",
}


pytestmark = pytest.mark.usefixtures("one_thread")  # small batches: one thread is fastest


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_shipped_weights_are_the_recorded_ones(dataset):
    path = oracle.weights_path(dataset)
    assert path.exists(), f"{path} is missing; run `apa train-oracle --dataset {dataset}`"
    assert _sha256(path) == SHIPPED_SHA256[dataset]
    meta = oracle.oracle_metadata(dataset)
    assert meta["dataset"] == dataset
    assert meta["info"]["confident_share_gaussian_noise"] == 0.0
    model = load_oracle(dataset)
    assert isinstance(model, Classifier) and not model.training
    # the fitted temperature, when one was fitted (the info keeps it to 4 decimals)
    assert model.config.temperature == pytest.approx(meta["info"].get("temperature", 1.0), abs=1e-4)
    assert model.features(torch.zeros(3, 1, 28, 28)).shape == (3, model.config.hidden)


def test_mnist_oracle_accuracy_on_held_out_digits(mnist_arrays):
    model = load_oracle("mnist")
    x = torch.from_numpy(mnist_arrays["test_images"][::5]).float().div(255).unsqueeze(1)  # 200 digits
    y = torch.from_numpy(mnist_arrays["test_labels"][::5])
    acc = (oracle.predict_proba(model, x).argmax(1) == y).float().mean().item()
    assert len(y) == 200 and acc >= 0.97


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_oracle_is_never_confident_on_noise_or_blanks(dataset):
    model = load_oracle(dataset)
    gen = torch.Generator().manual_seed(7)
    probes = [(0.5 + 0.5 * torch.randn(200, 1, 28, 28, generator=gen)).clamp(0, 1),
              torch.rand(200, 1, 28, 28, generator=gen),
              torch.linspace(0, 1, 200).view(-1, 1, 1, 1).expand(200, 1, 28, 28)]
    for x in probes:
        assert (oracle.predict_proba(model, x).max(1).values >= 0.9).sum().item() == 0


# ---------------------------------------------------------------- OracleUser arithmetic on a stub


def _logits(probs: dict[int, float]) -> list[float]:
    """Log-probabilities of a distribution given on some classes, the rest spread evenly."""
    rest = (1.0 - sum(probs.values())) / (10 - len(probs))
    return [math.log(probs.get(c, rest)) for c in range(10)]


ROWS = [{1: 0.95}, {1: 0.85, 4: 0.15 - 1e-6}, {2: 0.97}, {4: 0.92}]


class StubClassifier(nn.Module):
    """Returns the fixed logits of row i for an image whose first pixel is i / 100."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.tensor([_logits(r) for r in ROWS]), requires_grad=False)

    def forward(self, x):
        return self.table[(x[:, 0, 0, 0] * 100).round().long()]


def _images() -> torch.Tensor:
    x = torch.zeros(len(ROWS), 1, 28, 28)
    x[:, 0, 0, 0] = torch.arange(len(ROWS)) / 100
    return x


def _rest(row: dict) -> float:
    return (1.0 - sum(row.values())) / (10 - len(row))


def test_binary_scores():
    user = OracleUser(StubClassifier(), [4, 1])
    assert user.prefer == (1, 4) and user.name == "oracle[1,4]"
    # row 0: class 1 at 0.95 -> +1; row 1: class 1 at 0.85 < 0.9 -> -1; row 2: class 2 -> -1; row 3: class 4 at 0.92 -> +1
    assert user(_images()).tolist() == [1.0, -1.0, -1.0, 1.0]
    assert OracleUser(StubClassifier(), [1, 4], confidence=0.8)(_images()).tolist() == [1.0, 1.0, -1.0, 1.0]


def test_graded_scores():
    user = OracleUser(StubClassifier(), "1,4", mode="graded")
    expected = [0.95 + _rest(ROWS[0]), 1.0, 2 * _rest(ROWS[2]), 0.92 + _rest(ROWS[3])]
    assert user(_images()).tolist() == pytest.approx(expected, abs=1e-5)


def test_evaluate_report():
    report = OracleUser(StubClassifier(), [1, 4]).evaluate(_images())
    assert report["preferred_share"] == 0.75  # rows 0, 1, 3 predict a preferred class
    assert report["confident_share"] == 0.75  # rows 0, 2, 3 are confident
    assert report["preferred_confident_share"] == 0.5  # rows 0 and 3
    assert report["class_histogram"] == [0, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    assert report["preferred_class_shares"] == {1: 0.5, 4: 0.5}
    assert report["mean_score"] == 0.0


def test_union_is_the_max_over_users():
    stub = StubClassifier()
    a, b = OracleUser(stub, [1]), OracleUser(stub, [2])
    assert a(_images()).tolist() == [1.0, -1.0, -1.0, -1.0]
    assert b(_images()).tolist() == [-1.0, -1.0, 1.0, -1.0]
    both = union([a, b])
    assert both(_images()).tolist() == [1.0, -1.0, 1.0, -1.0]
    ga, gb = OracleUser(stub, [1], mode="graded"), OracleUser(stub, [4], mode="graded")
    assert torch.equal(union([ga, gb])(_images()), torch.maximum(ga(_images()), gb(_images())))
    report = both.evaluate(_images())
    assert set(report["per_user"]) == {a.name, b.name} and report["preferred_confident_share"] == 0.5


def test_bad_preferences_and_modes_are_refused():
    with pytest.raises(ValueError, match="valid classes are 0..9"):
        OracleUser(StubClassifier(), [3, 12])
    with pytest.raises(ValueError, match="empty"):
        OracleUser(StubClassifier(), [])
    with pytest.raises(ValueError, match="comma-separated"):
        OracleUser(StubClassifier(), "one,two")
    with pytest.raises(ValueError, match="binary, graded"):
        OracleUser(StubClassifier(), [1], mode="soft")


# ---------------------------------------------------------------- factory, loading, training


def test_registered_factory_uses_the_prior_dataset():
    user = FEEDBACK.create("oracle", {"prefer": "1,4,7,9", "mode": "graded"}, SimpleNamespace(name="fashion"))
    assert user.prefer == (1, 4, 7, 9) and user.mode == "graded"
    assert user.classifier.config == load_oracle("fashion").config
    with pytest.raises(ValueError, match="prefer"):
        FEEDBACK.create("oracle", {}, SimpleNamespace(name="mnist"))


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apa train-oracle --dataset fashion"):
        load_oracle("fashion", tmp_path / "absent.safetensors")


def test_training_resumes_where_it_stopped(tmp_path, mnist_arrays):
    def config(steps):
        return oracle.OracleRecipe(TrainConfig(steps=steps, batch_size=16, warmup=2, checkpoint_every=5, seed=3))

    train_oracle("mnist", tmp_path / "run", config(5), progress=False, limit=256, arrays=mnist_arrays)
    resumed = train_oracle("mnist", tmp_path / "run", config(8), progress=False, limit=256, arrays=mnist_arrays)
    with open(tmp_path / "run" / "loss.csv") as f:
        assert [int(row[0]) for row in csv.reader(f)] == list(range(1, 9))
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)["step"] == 8
    straight = train_oracle("mnist", tmp_path / "straight", config(8), progress=False, limit=256, arrays=mnist_arrays)
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


# ---------------------------------------------------------------- calibration and the blends' targets


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20_000, 10, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=gen).squeeze(1)
    # NLL is flat near its minimum: 20,000 draws pin T = 2 to a few percent (the grid step is 0.4%)
    assert abs(oracle.fit_temperature(logits, labels) - 2.0) < 0.1


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
    train_oracle("mnist", tmp_path / "run", recipe, progress=False, limit=256, arrays=mnist_arrays)
    path, info = oracle.export_from_run("mnist", tmp_path / "run", tmp_path / "o.safetensors", arrays=mnist_arrays)
    assert info["train_images"] == 256 - 64 and info["blend_target"] == "mixed"
    assert info["validation_nll"] <= info["validation_nll_at_1"]
    model = load_oracle("mnist", path)
    assert model.config.temperature == pytest.approx(info["temperature"], abs=1e-4) and info["temperature"] != 1.0
