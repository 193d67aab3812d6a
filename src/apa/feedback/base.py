"""④ Who answers: a feedback source scores the images a user is shown.

A source is any callable ``(images [k, C, H, W] float32 in [0, 1]) -> scores [k] float32``.
Higher is better. Sources that simulate a user also expose ``evaluate`` for reports
(e.g. the oracle's class histogram); a person's ratings come through the web page instead.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


class FeedbackError(ValueError):
    """A feedback source gave an answer that cannot be recorded (NaN, wrong shape, out of range)."""


@runtime_checkable
class FeedbackSource(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, C, H, W] in [0, 1] -> scores [k] (finite floats)."""


def check_scores(scores: torch.Tensor, k: int, source: str) -> torch.Tensor:
    """Refuse an answer that cannot be stored: wrong shape or non-finite values."""
    scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
    if scores.shape[0] != k:
        raise FeedbackError(f"feedback source {source!r} returned {scores.shape[0]} scores for {k} images")
    bad = (~torch.isfinite(scores)).nonzero().flatten().tolist()
    if bad:
        raise FeedbackError(f"feedback source {source!r} returned non-finite scores at positions {bad}; "
                            "nothing from this round was recorded")
    return scores
