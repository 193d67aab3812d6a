"""⑥ A session's state: its store and configuration, the read-only queries on them, and its timings.

Every other part of a session reads the rounds, ratings and changes of taste through here; only the
session's steps (``apa.session.core``) write, and they write through the store.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

from apa.config import AlignConfig
from apa.session.examples import GIVEN
from apa.store import Store


def normalise_scores(scores: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Map a source's scores from its scale [lo, hi] onto the surrogate's target range [-1, 1]."""
    lo, hi = scale
    return 2.0 * (scores - lo) / (hi - lo) - 1.0


class Timings(defaultdict):
    """Seconds per part of the work (sampling, surrogate_fit, feedback, io, ...), summed over a session's runs."""

    def __init__(self, earlier: dict[str, float] | None = None):
        super().__init__(float, earlier or {})

    @contextmanager
    def timer(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[what] += time.perf_counter() - t0


class SessionState:
    """One session's store and configuration, with the queries the steps and the reports ask.
    ``scale``: the [lo, hi] the ratings lie on (the feedback source's); ``event_shape``: a particle's."""

    def __init__(self, store: Store, cfg: AlignConfig, scale: tuple[float, float],
                 event_shape: tuple[int, ...]):
        self.store, self.cfg, self.scale, self.event_shape = store, cfg, tuple(scale), tuple(event_shape)

    def rated(self, r: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Round r's rated particles [m, *event] and their targets in [-1, 1] [m]; None without a rating."""
        rated = [x for x in self.store.ratings(r) if x["score"] is not None]
        if not rated:
            return None
        parts = self.store.round_tensors(r)["particles"]
        scores = torch.tensor([x["score"] for x in rated], dtype=torch.float32)
        return parts[torch.tensor([x["particle"] for x in rated])], normalise_scores(scores, self.scale)

    def rated_rounds(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per round with ratings: (round, its rated particles [m, *event], their targets in [-1, 1] [m])."""
        rounds = [(row["round"], self.rated(row["round"])) for row in self.store.rounds()]
        return [(r, *got) for r, got in rounds if got is not None]

    def training_set(self, since: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the surrogate is refit on: the rated particles of the rounds remembered (from
        ``forget_point()``, or ``since`` if later), the last ``--window`` of them, with the weight
        ``--discount`` ** (rounds of age) each: ([n, *event], targets [n], weights [n] or None when
        every weight is 1)."""
        start = max(self.forget_point(), since)
        rounds = [(r, x, y) for r, x, y in self.rated_rounds() if r >= start]
        if not rounds:
            return torch.zeros(0, *self.event_shape), torch.zeros(0), None
        x, y = torch.cat([x for _, x, _ in rounds]), torch.cat([y for _, _, y in rounds])
        age = torch.cat([torch.full((len(y),), rounds[-1][0] - r, dtype=torch.float32) for r, _, y in rounds])
        sc = self.cfg.surrogate
        keep = slice(-min(sc.window, len(y)), None) if sc.window is not None else slice(None)  # past n: all n
        w = None if sc.discount == 1.0 else sc.discount ** age[keep]
        return x[keep], y[keep], w

    def searching(self) -> bool:
        """Whether the session has rated images but never liked one (none above the scale's midpoint, in any
        round, forgotten or not): what the rounds show is then a search (``--search``). After a change of
        taste the earlier likes still count here: the rounds then explore as ``--explore`` says."""
        return self._none_liked(self.store.ratings())

    def tilt_missed(self, r: int) -> bool:
        """Whether round r was steered by a surrogate and the user liked none of its rated tilted images (the
        weighted particles; plain ones shown beside them are not the tilt's). False for round -1, a search
        round, the round of given images, and a round with no rating of a tilted image."""
        info = next((row["info"] for row in self.store.rounds() if row["round"] == r), {})
        if not info.get("beta_used"):
            return False
        tilted = torch.isfinite(self.store.round_tensors(r)["log_weights"])
        return self._none_liked([x for x in self.store.ratings(r) if bool(tilted[x["particle"]])])

    def likes(self, score: float) -> bool:
        """Whether a rating says the user liked the image: above the scale's midpoint."""
        lo, hi = self.scale
        return score > (lo + hi) / 2

    def _none_liked(self, ratings: list[dict]) -> bool:
        """Whether ``ratings`` (the store's rows) hold a score and none of them a like."""
        scores = [x["score"] for x in ratings if x["score"] is not None]
        return bool(scores) and not any(self.likes(s) for s in scores)

    def changes(self) -> list[int]:
        """The rounds where the taste changed, in order: each detected one (``--detect-change``) and each
        one the person named (``--forget-before``, numbered from 1; stored here from 0)."""
        detected = [row["round"] for row in self.store.rounds() if row["info"].get("change_detected")]
        said = [*self.store.forget_marks(), self.cfg.session.forget_before]
        return sorted(set(detected + [m - 1 for m in said if m is not None]))

    def forget_point(self) -> int:
        """The first round whose ratings are remembered: the last change of taste (0: every round)."""
        return max([0, *self.changes()])

    def first_guided_round(self) -> int:
        """The first round sampled with a surrogate: the one after the first round that fitted one."""
        fitted = [row["round"] for row in self.store.rounds() if self.store.surrogate_path(row["round"]).exists()]
        return fitted[0] + 1 if fitted else len(self.store.rounds())

    def explore_share(self, r: int) -> float:
        """The share of round r's shown images drawn from the plain prior: ``explore`` in the first
        ``explore_rounds`` guided rounds (every one when none) and in as many after a change of taste,
        0 otherwise."""
        sc = self.cfg.session
        guided = r - max([self.first_guided_round(), *[c + 1 for c in self.changes()]])
        return sc.explore if sc.explore_rounds is None or guided < sc.explore_rounds else 0.0

    def liked_shares(self) -> list[float | None]:
        """Per round, the share of its rated shown images the user liked (a rating above the scale's
        midpoint); None for a round with no rating, and for the round of images the user gave
        (``--examples``). What a person was shown, round by round."""
        out = []
        for row in self.store.rounds():
            scores = [x["score"] for x in self.store.ratings(row["round"])
                      if x["score"] is not None and x["source"] != GIVEN]
            out.append(sum(self.likes(s) for s in scores) / len(scores) if scores else None)
        return out

    def shown_particles(self, r: int) -> torch.Tensor:
        """What round r showed, as particles [k, *event]."""
        t = self.store.round_tensors(r)
        return t["particles"][t["shown"].long()]

    def history_particles(self) -> torch.Tensor | None:
        """All particles shown so far [H, *event] (for diversity against history)."""
        parts = [self.shown_particles(row["round"]) for row in self.store.rounds()]
        return torch.cat(parts) if parts else None
