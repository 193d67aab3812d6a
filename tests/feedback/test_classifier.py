"""The oracle classifier: the shipped weights, their accuracy, calibration and refusal of non-digits."""

from __future__ import annotations

import hashlib

import pytest
import torch

from apa.feedback import classifier
from apa.feedback.classifier import Classifier, load_oracle

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
    path = classifier.weights_path(dataset)
    assert path.exists(), f"{path} is missing; run `apa train-oracle --dataset {dataset}`"
    assert _sha256(path) == SHIPPED_SHA256[dataset]
    meta = classifier.oracle_metadata(dataset)
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
    acc = (classifier.predict_proba(model, x).argmax(1) == y).float().mean().item()
    assert len(y) == 200 and acc >= 0.97


@pytest.mark.parametrize("dataset", ["mnist", "fashion"])
def test_oracle_is_never_confident_on_noise_or_blanks(dataset):
    model = load_oracle(dataset)
    gen = torch.Generator().manual_seed(7)
    probes = [(0.5 + 0.5 * torch.randn(200, 1, 28, 28, generator=gen)).clamp(0, 1),
              torch.rand(200, 1, 28, 28, generator=gen),
              torch.linspace(0, 1, 200).view(-1, 1, 1, 1).expand(200, 1, 28, 28)]
    for x in probes:
        assert (classifier.predict_proba(model, x).max(1).values >= 0.9).sum().item() == 0


def test_missing_weights_name_the_training_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apa train-oracle --dataset fashion"):
        load_oracle("fashion", tmp_path / "absent.safetensors")


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at():
    gen = torch.Generator().manual_seed(0)
    logits = 3.0 * torch.randn(20_000, 10, generator=gen)
    labels = torch.multinomial(torch.softmax(logits / 2.0, dim=1), 1, generator=gen).squeeze(1)
    # NLL is flat near its minimum: 20,000 draws pin T = 2 to a few percent (the grid step is 0.4%)
    assert abs(classifier.fit_temperature(logits, labels) - 2.0) < 0.1
