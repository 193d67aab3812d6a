"""④ Who answers: a feedback source scores the images a user is shown.

A source is a callable ``(images [k, C, H, W] float32 in [0, 1]) -> scores [k] float32``; higher
is better. What else it offers is declared as data on :class:`FeedbackSource`, never found by
probing: the scale of its answers, the classes a simulated user likes, its report on a batch, the
classes it sees. A person's ratings come through the web page, so the human source declares only
its scale. A wrapper (:class:`ErringUser`, ``DriftingUser``, ``baselines.common.CountingUser``)
forwards each capability (:data:`CAPABILITIES`) explicitly.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from apa.feedback.tastes import Taste


class FeedbackError(ValueError):
    """A feedback source gave an answer that cannot be recorded (NaN, wrong shape, out of range)."""


BINARY_SCALE = (-1.0, 1.0)  # the scale of a source that declares none: +1 liked, -1 not


@runtime_checkable
class FeedbackSource(Protocol):
    """Who answers, and what else it offers. A source subclasses this class, inherits the defaults
    (nothing offered) and sets what it has; a method of the same name declares a callable one."""

    name: str  # the rater's name, as the store records it
    scale: tuple[float, float] = BINARY_SCALE  # the [lo, hi] its answers lie on
    # the classes a simulated user likes; None: a person, or a liking no class set names (CLIP prompts)
    prefer: tuple[int, ...] | None = None
    # a simulated user's report on images [k, C, H, W] (shares, histograms); None: a person
    evaluate: Callable[[torch.Tensor], dict] | None = None
    # the classes the user sees: images [k, C, H, W] -> P(class | image) [k, classes]; None: it sees none
    probabilities: Callable[[torch.Tensor], torch.Tensor] | None = None
    confidence: float | None = None  # the top probability from which the class it sees counts as confident
    taste: Taste | None = None  # a liking no class names (``feedback.tastes``); None: ``prefer`` is the liking
    # the network it sees through (the oracle's, whose features measure diversity and FD); None: none
    classifier: torch.nn.Module | None = None

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [k, C, H, W] in [0, 1] -> scores [k] (finite floats on ``scale``)."""


# what a wrapper forwards from the source it wraps (its name is its own)
CAPABILITIES = ("scale", "prefer", "evaluate", "probabilities", "confidence", "taste", "classifier")


def forward_capabilities(wrapper: FeedbackSource, source: FeedbackSource) -> None:
    """Give ``wrapper`` each capability ``source`` declares (:data:`CAPABILITIES`), by name: what a
    wrapper that changes only the answers (or counts them) offers is its source's."""
    for name in CAPABILITIES:
        setattr(wrapper, name, getattr(source, name))


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


class ErringUser(FeedbackSource):
    """A simulated user who errs: each answer is flipped on the source's scale (s -> lo + hi − s)
    with probability ``p``. Whether an image's answer flips is a function of the image itself and
    ``seed`` (a hash of its pixels), so the same image always gets the same answer: a session
    resumed after a crash, and every method of a comparison, see the same user. Everything else
    (``evaluate``, ``prefer``, ...: :data:`CAPABILITIES`) is the true user's.
    """

    def __init__(self, source: FeedbackSource, p: float, seed: int = 0):
        if not 0.0 <= p < 0.5:
            raise ValueError(f"--label-noise must be in [0, 0.5), got {p}")
        self.source, self.p, self.seed = source, float(p), int(seed)
        self.name = f"{source.name}+noise{p:g}"
        forward_capabilities(self, source)

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


def with_label_noise(source: FeedbackSource | None, p: float, seed: int) -> FeedbackSource | None:
    """``source`` itself when p = 0, else an :class:`ErringUser` around it."""
    return source if source is None or p == 0.0 else ErringUser(source, p, seed)
