"""A simulated user whose taste changes mid-session: one oracle before, another after.

``--prefer 1,4,7,9 --drift-to 2,3,5 --drift-at 40`` rates the first 40 images by {1,4,7,9} and
every later one by {2,3,5} (an abrupt switch). With ``--drift-span S`` the change is gradual:
the n-th rating (0-based) follows the new taste with probability min(1, (n − at + 1)/S) once
n ≥ at, so the two tastes are mixed over S ratings. Which taste answers rating n is a function of
(seed, n) alone, so a session resumed across the switch hears the same answers as one that ran
through it. The session tells the user how many ratings it has given (:meth:`DriftingUser.at`)
before each round's question.
"""

from __future__ import annotations

import torch

from apa.feedback.base import FeedbackSource
from apa.seeding import generator


class DriftingUser(FeedbackSource):
    """Feedback from ``before`` up to rating ``at``, then from ``after`` (mixed over ``span`` ratings).

    ``__call__(images [k, C, H, W]) -> scores [k]`` answers ratings seen, seen+1, ..., seen+k−1 and
    advances ``seen``. The scale is the two tastes' (``before``'s); every other capability
    (``evaluate``, ``prefer``, ...) is the current taste's (the new one once the change is
    complete): a final batch is judged by what the user likes at the end.
    """

    def __init__(self, before: FeedbackSource, after: FeedbackSource, at: int, span: int = 0, seed: int = 0):
        if at < 0 or span < 0:
            raise ValueError(f"--drift-at and --drift-span must be at least 0, got {at} and {span}")
        self.before, self.after, self.at_rating, self.span, self.seed = before, after, int(at), int(span), int(seed)
        self.name = f"{before.name}->{after.name}@{at}" + (f"+{span}" if span else "")
        self.scale = tuple(before.scale)
        self.seen = 0  # ratings given so far

    def at(self, n: int) -> "DriftingUser":
        """Set the number of ratings given so far (the session's count), before a question."""
        self.seen = int(n)
        return self

    def p_after(self, n: int) -> float:
        """The probability that rating n (0-based) follows the new taste."""
        if n < self.at_rating:
            return 0.0
        return 1.0 if self.span == 0 else min(1.0, (n - self.at_rating + 1) / self.span)

    def follows_after(self, n: int) -> bool:
        """Whether rating n follows the new taste: a coin of (seed, n) against :meth:`p_after`."""
        p = self.p_after(n)
        if p in (0.0, 1.0):
            return p == 1.0
        return float(torch.rand((), generator=generator(self.seed, n, "drift"))) < p

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, C, H, W] -> scores [k]; each from the taste its rating index follows."""
        k = images.shape[0]
        new = torch.tensor([self.follows_after(self.seen + i) for i in range(k)], dtype=torch.bool)
        scores = torch.empty(k, dtype=torch.float32, device=images.device)
        if (~new).any():
            scores[~new.to(images.device)] = torch.as_tensor(self.before(images[~new]), dtype=torch.float32)
        if new.any():
            scores[new.to(images.device)] = torch.as_tensor(self.after(images[new]), dtype=torch.float32)
        self.seen += k
        return scores

    def current(self) -> FeedbackSource:
        """The taste that answers now: the new one from the first rating it surely follows."""
        return self.after if self.p_after(self.seen) >= 1.0 else self.before

    @property
    def evaluate(self):
        return self.current().evaluate

    @property
    def prefer(self):
        return self.current().prefer

    @property
    def probabilities(self):
        return self.current().probabilities

    @property
    def confidence(self):
        return self.current().confidence

    @property
    def taste(self):
        return self.current().taste

    @property
    def classifier(self):
        return self.current().classifier
