"""A simulated user: the oracle classifier (``apa.feedback.classifier``) plus a set of preferred classes.

:class:`OracleUser` turns the classifier into feedback: in ``binary`` mode (PAPA's) an image
scores +1 when the predicted class is preferred and the prediction is confident, else -1; in
``graded`` mode it scores the probability mass on the preferred classes. ``classifier.parse_classes``
reads a preference by class number or name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from apa import data as data_mod
from apa.feedback.base import FeedbackSource
from apa.feedback.classifier import NUM_CLASSES, load_oracle, parse_classes, predict_proba
from apa.feedback.tastes import parse_taste, taste_user
from apa.registry import FEEDBACK

MODES = ("binary", "graded")


class OracleUser(FeedbackSource):
    """A simulated user: the oracle classifier and the classes this user likes.

    ``__call__(images [k, 1, 28, 28] in [0, 1]) -> scores [k]``:
    - ``binary`` (PAPA's feedback): +1 when the predicted class is preferred and its probability
      is at least ``confidence``, else -1;
    - ``graded``: the probability mass on the preferred classes, in [0, 1].
    """

    def __init__(self, classifier: nn.Module, prefer: int | str | Iterable[int], mode: str = "binary",
                 confidence: float = 0.9, name: str | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown oracle mode {mode!r}; choose one of {', '.join(MODES)}")
        if not 0.0 < confidence <= 1.0:
            raise ValueError(f"confidence must be in (0, 1], got {confidence}")
        self.classifier = classifier
        self.prefer = parse_classes(prefer)
        self.mode = mode
        self.confidence = float(confidence)
        self.name = name or f"oracle[{','.join(map(str, self.prefer))}]"
        self._mask = torch.zeros(NUM_CLASSES, dtype=torch.bool)
        self._mask[list(self.prefer)] = True

    def probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """[k, 1, 28, 28] in [0, 1] -> class probabilities [k, 10] (CPU)."""
        return predict_proba(self.classifier, images)

    def scores_from_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """Class probabilities [k, 10] -> scores [k] under this user's mode."""
        if self.mode == "graded":
            return probs[:, self._mask].sum(dim=1)
        top, pred = probs.max(dim=1)
        liked = self._mask[pred] & (top >= self.confidence)
        return liked.float() * 2.0 - 1.0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, 1, 28, 28] in [0, 1] -> scores [k] float32 (on the images' device)."""
        return self.scores_from_probs(self.probabilities(images)).to(images.device)

    def evaluate(self, images: torch.Tensor) -> dict:
        """Report on samples [k, 1, 28, 28]: shares of preferred / confident predictions and histograms.

        ``class_histogram`` counts confident predictions per class (10 counts);
        ``preferred_class_shares`` maps each preferred class to its share among the samples that
        are both preferred and confident (0 for all when there are none).
        """
        probs = self.probabilities(images)
        top, pred = probs.max(dim=1)
        confident = top >= self.confidence
        preferred = self._mask[pred]
        both = preferred & confident
        hist = torch.bincount(pred[confident], minlength=NUM_CLASSES)
        n_both = int(both.sum())
        k = max(len(pred), 1)
        return {"n": len(pred), "preferred": list(self.prefer),
                "preferred_share": float(preferred.sum()) / k,
                "confident_share": float(confident.sum()) / k,
                "preferred_confident_share": n_both / k,
                "mean_score": float(self.scores_from_probs(probs).mean()) if len(pred) else 0.0,
                "class_histogram": [int(c) for c in hist],
                "preferred_class_shares": {c: (int(hist[c]) / n_both if n_both else 0.0) for c in self.prefer}}


class UnionUser(FeedbackSource):
    """Several simulated users answering as one: each image scores the maximum over the users."""

    def __init__(self, users: Sequence[OracleUser], name: str | None = None):
        if not users:
            raise ValueError("union() needs at least one user")
        self.users = list(users)
        self.name = name or "union(" + " | ".join(u.name for u in self.users) + ")"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, 1, 28, 28] -> scores [k]: the maximum of the users' scores."""
        return torch.stack([u(images) for u in self.users]).max(dim=0).values

    def evaluate(self, images: torch.Tensor) -> dict:
        """Each user's report under ``per_user``; when all users share one classifier, mode and
        confidence, also the report of one user preferring the union of their classes (top level)."""
        report: dict = {"per_user": {u.name: u.evaluate(images) for u in self.users}}
        first = self.users[0]
        if all(u.classifier is first.classifier and u.mode == first.mode and u.confidence == first.confidence
               for u in self.users):
            merged = OracleUser(first.classifier, [c for u in self.users for c in u.prefer], first.mode,
                                first.confidence)
            report.update(merged.evaluate(images))
        return report


def union(users: Sequence[OracleUser]) -> UnionUser:
    """A feedback source whose score is the maximum over several users' scores."""
    return UnionUser(users)


@FEEDBACK.register("oracle")
def make_oracle(options: dict, prior) -> OracleUser:
    """The ``oracle`` feedback: options ``prefer`` (ints, names or "1,4,7,9" / "sandal,sneaker", required), ``mode``
    ("binary" | "graded", default binary), ``confidence`` (default 0.9), ``dataset`` (default the
    prior's name when it is mnist/fashion, else mnist), ``oracle_weights`` (a path, optional)."""
    if options.get("prefer") is None:
        raise ValueError("the oracle feedback needs a preference set: set prefer, e.g. prefer=1,4,7,9")
    dataset = options.get("dataset") or (prior.name if prior.name in data_mod.DATASETS else "mnist")
    if dataset not in data_mod.DATASETS:
        raise ValueError(f"unknown oracle dataset {dataset!r}; choose one of {', '.join(data_mod.DATASETS)}")
    weights = options.get("oracle_weights")
    classifier = load_oracle(dataset, Path(weights) if weights else None)
    prefer = parse_classes(options["prefer"], data_mod.class_names(dataset))
    user = OracleUser(classifier, prefer, mode=options.get("mode", "binary"),
                      confidence=float(options.get("confidence", 0.9)))
    if not options.get("taste"):
        return user
    spec = parse_taste(options["taste"], float(options.get("taste_share", 0.02)), data_mod.class_names(dataset))
    return taste_user(user, spec, prior, dataset, int(options.get("taste_pool", 2048)))
