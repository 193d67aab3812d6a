"""What every method of the comparison shares: the signature, the record of a run, the rating budget.

Every method is a function with one signature:

    run(prior, user, budget, per_round, seed, *, config=None, checkpoints=(), eval_samples=64,
        workdir=None) -> MethodRun

It spends ``budget`` ratings of ``user`` in rounds of ``per_round`` images (the last round may be
smaller), and whenever the feedback spent reaches a value in ``checkpoints`` it draws
``eval_samples`` images from the sampler as it stands then, so one run gives the whole curve of
quality against feedback spent. Images are [n, C, H, W] in [0, 1].
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from apa.feedback.base import FeedbackSource, forward_capabilities
from apa.priors.base import Prior
from apa.priors.calls import counting
from apa.session.state import normalise_scores
from apa.smc.sampler import sample_prior

Sampler = Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> images [n, C, H, W]


class BudgetError(ValueError):
    """The budget, round size or checkpoints do not fit together; the message says what to change."""


@dataclass(frozen=True)
class RoundRecord:
    """One round of feedback: what was rated and what it cost."""

    round: int
    spent: int  # feedback spent after this round (ratings so far)
    scores: tuple[float, ...]  # the round's ratings, in the user's scale
    images: torch.Tensor  # the rated images [k, C, H, W] in [0, 1]
    seconds: float  # wall time of the round (sampling, rating, updating)


@dataclass(frozen=True)
class MethodRun:
    """A finished run: the rounds, the evaluation batches and the final aligned sampler."""

    method: str
    records: tuple[RoundRecord, ...]
    checkpoints: dict[int, torch.Tensor]  # feedback spent -> evaluation images [eval_samples, C, H, W]
    sample: Sampler  # the final sampler (after the whole budget)
    seconds: float  # wall time of the alignment itself (checkpoint evaluations excluded)
    eval_seconds: dict[int, float] = field(default_factory=dict)  # feedback spent -> time to draw its batch
    oracle_ratings: int = 0  # images the user rated (the feedback actually spent)
    info: dict[str, Any] = field(default_factory=dict)
    eval_calls: dict[int, int] = field(default_factory=dict)  # feedback spent -> network-call rows of its batch


def round_sizes(budget: int, per_round: int) -> list[int]:
    """Images rated per round: per_round each, the last round what is left. [8, 8, 4] for (20, 8)."""
    if per_round < 1:
        raise BudgetError(f"per_round must be at least 1, got {per_round}")
    if budget < 1:
        raise BudgetError(f"the budget must be at least 1 rating, got {budget}")
    return [min(per_round, budget - spent) for spent in range(0, budget, per_round)]


def check_checkpoints(checkpoints: Sequence[int], budget: int, per_round: int) -> tuple[int, ...]:
    """The checkpoints, sorted; each must be a feedback total the rounds actually reach."""
    reachable = set()
    spent = 0
    for k in round_sizes(budget, per_round):
        spent += k
        reachable.add(spent)
    bad = sorted(set(checkpoints) - reachable)
    if bad:
        raise BudgetError(f"checkpoints {bad} are never reached with budget {budget} and {per_round} per round; "
                          f"use multiples of {per_round} up to {budget}")
    return tuple(sorted(set(checkpoints)))


class CountingUser(FeedbackSource):
    """Wraps a feedback source and counts the images it rated; everything the source declares
    (``feedback.base.CAPABILITIES``: ``evaluate``, ``prefer``, ...) is passed through, uncounted."""

    def __init__(self, user: FeedbackSource):
        self.user, self.name, self.rated = user, user.name, 0
        forward_capabilities(self, user)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, C, H, W] in [0, 1] -> scores [k]."""
        self.rated += int(images.shape[0])
        return self.user(images)


def to_targets(scores: torch.Tensor, user: FeedbackSource) -> torch.Tensor:
    """A user's scores [k] mapped from its scale onto [-1, 1] (binary oracle: +1 / -1 unchanged)."""
    return normalise_scores(scores.float(), user.scale)


@torch.no_grad()
def plain_samples(prior: Prior, n: int, steps: int, gen: torch.Generator, batch: int = 64) -> torch.Tensor:
    """n samples of a prior by its ancestral sampler over ``steps`` steps: images [n, C, H, W]."""
    return sample_prior(prior, n, steps, gen, batch) if n > 0 else torch.zeros(0, *prior.event_shape)


class Clock:
    """Wall time of a run, with the checkpoint evaluations kept apart."""

    def __init__(self):
        self.start = time.perf_counter()
        self.excluded = 0.0
        self.eval_seconds: dict[int, float] = {}
        self.eval_calls: dict[int, int] = {}

    def evaluate(self, spent: int, draw: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run ``draw`` (an evaluation batch at ``spent``), its time excluded from the run's time and its
        network-call rows kept apart (``eval_calls``)."""
        t0 = time.perf_counter()
        with counting() as calls:
            images = draw()
        self.eval_calls[spent] = calls.total
        dt = time.perf_counter() - t0
        self.excluded += dt
        self.eval_seconds[spent] = dt
        return images

    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded
