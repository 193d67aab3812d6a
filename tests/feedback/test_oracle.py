"""The simulated user built on the oracle classifier: scores, reports, unions, refusals."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from apa.feedback.classifier import load_oracle
from apa.feedback.oracle import OracleUser, union
from apa.registry import FEEDBACK

pytestmark = pytest.mark.usefixtures("one_thread")  # small batches: one thread is fastest

ROWS = [{1: 0.95}, {1: 0.85, 4: 0.15 - 1e-6}, {2: 0.97}, {4: 0.92}]


def _logits(probs: dict[int, float]) -> list[float]:
    """Log-probabilities of a distribution given on some classes, the rest spread evenly."""
    rest = (1.0 - sum(probs.values())) / (10 - len(probs))
    return [math.log(probs.get(c, rest)) for c in range(10)]


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


def test_registered_factory_uses_the_prior_dataset():
    user = FEEDBACK.create("oracle", {"prefer": "1,4,7,9", "mode": "graded"}, SimpleNamespace(name="fashion"))
    assert user.prefer == (1, 4, 7, 9) and user.mode == "graded"
    assert user.classifier.config == load_oracle("fashion").config
    with pytest.raises(ValueError, match="prefer"):
        FEEDBACK.create("oracle", {}, SimpleNamespace(name="mnist"))
