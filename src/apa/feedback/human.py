"""A person's ratings: 1 (worst) to 5 (best), or a skip, given on the web page of `apa serve`.

This source exists so that ``--feedback human`` names a real entry of the feedback registry and
declares the scale of a person's answers; the session maps scores from that scale onto the
surrogate's [-1, 1] targets. A person answers through the page, so calling it is an error.
"""

from __future__ import annotations

import torch

from apa.feedback.base import FeedbackSource
from apa.registry import FEEDBACK

SCALE = (1.0, 5.0)
RATINGS = (1, 2, 3, 4, 5)


class HumanFeedback(FeedbackSource):
    """The ``human`` feedback source: scale 1..5, answered through `apa serve`, never by a call."""

    name = "human"
    scale = SCALE

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("feedback 'human' is given by a person on the web page: run `apa serve --prior mnist` "
                           "and rate the images in the browser; `apa align` needs a simulated user "
                           "such as --feedback oracle")


@FEEDBACK.register("human")
def make_human(options: dict | None = None, prior=None) -> HumanFeedback:
    """The ``--feedback human`` factory; it takes no options."""
    return HumanFeedback()
