"""④ Who answers: a feedback source scores the images a user is shown.

A source is any callable ``(images [k, C, H, W] float32 in [0, 1]) -> scores [k] float32``.
Higher is better. Sources that simulate a user also expose ``evaluate`` for reports
(e.g. the oracle's class histogram); a person's ratings come through the web page instead.
"""

from __future__ import annotations

import hashlib
from typing import Protocol, runtime_checkable

import torch


class FeedbackError(ValueError):
    """A feedback source gave an answer that cannot be recorded (NaN, wrong shape, out of range)."""


@runtime_checkable
class FeedbackSource(Protocol):
    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, C, H, W] in [0, 1] -> scores [k] (finite floats)."""


BINARY_SCALE = (-1.0, 1.0)  # the scale of a source that declares none: +1 liked, -1 not


def scale_of(source) -> tuple[float, float]:
    """The [lo, hi] a source's answers lie on: its ``scale``, else BINARY_SCALE."""
    return tuple(getattr(source, "scale", BINARY_SCALE))


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


class ErringUser:
    """A simulated user who errs: each answer is flipped on the source's scale (s -> lo + hi − s)
    with probability ``p``. Whether an image's answer flips is a function of the image itself and
    ``seed`` (a hash of its pixels), so the same image always gets the same answer: a session
    resumed after a crash, and every method of a comparison, see the same user.
    """

    def __init__(self, source: FeedbackSource, p: float, seed: int = 0):
        if not 0.0 <= p < 0.5:
            raise ValueError(f"--label-noise must be in [0, 0.5), got {p}")
        self.source, self.p, self.seed = source, float(p), int(seed)
        self.name = f"{source.name}+noise{p:g}"
        self.scale = scale_of(source)

    def flips(self, images: torch.Tensor) -> torch.Tensor:
        """Which answers this user gets wrong: images [k, ...] -> bool [k]."""
        out = []
        for image in images.detach().float().cpu().contiguous():
            digest = hashlib.sha256(image.numpy().tobytes() + self.seed.to_bytes(8, "little", signed=True)).digest()
            out.append(int.from_bytes(digest[:8], "little") / 2**64 < self.p)
        return torch.tensor(out, dtype=torch.bool)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        scores = torch.as_tensor(self.source(images), dtype=torch.float32)
        lo, hi = self.scale
        flip = self.flips(images).to(scores.device)
        return torch.where(flip, lo + hi - scores, scores)

    def __getattr__(self, name: str):  # evaluate, prefer, classifier, ...: the true user's
        return getattr(self.source, name)


def with_label_noise(source: FeedbackSource | None, p: float, seed: int) -> FeedbackSource | None:
    """``source`` itself when p = 0, else an :class:`ErringUser` around it."""
    return source if source is None or p == 0.0 else ErringUser(source, p, seed)
