"""⑥ One user's loop: sample a round with FKC-SMC, show k particles, record ratings, refit, repeat.

The loop is a sequence of durable steps; each writes through the store before the next begins:
  round r sampled (particles, log-weights, what is shown) -> each rating -> surrogate refit + round
  complete -> ... -> final evaluation batch.
Every random choice is seeded by (seed, round, purpose), so a session resumed after a crash at
any point ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch

from apa.components import shared_feedback, shared_prior
from apa.config import AlignConfig
from apa.feedback.base import FeedbackSource, check_scores, with_label_noise
from apa.feedback.drift import DriftingUser
from apa.lifecycle import DONE, FINAL, FIT, RATE, SAMPLE, next_action
from apa.rounds.checks import (SessionError, check_device, check_forget_before, check_prior,  # noqa: F401
                               check_tastes, validate, validate_new)
from apa.rounds.final import FinalBatch
from apa.rounds.fitting import Fitting
from apa.rounds.sampling import RoundSampling
from apa.store import SessionStore, StoreError


class Session(RoundSampling, Fitting, FinalBatch):
    """One user's session: the store, the configuration, the prior and who rates; the round functions
    (``apa.rounds``) it is made of, driven by ``next_action``."""

    def __init__(self, store: SessionStore, cfg: AlignConfig, prior: Any, feedback: FeedbackSource | None,
                 progress: bool = True):
        self.store, self.cfg, self.prior, self.feedback, self.progress = store, cfg, prior, feedback, progress
        self.comm = None  # a torchrun launch's ranks (apa.ranks): the rounds' populations are sharded over them
        self.timings: dict[str, float] = defaultdict(float)  # seconds: sampling, surrogate fit, feedback, I/O

    @contextmanager
    def timer(self, what: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] += time.perf_counter() - t0

    # ------------------------------------------------------------ construction

    @staticmethod
    def components(cfg: AlignConfig, batch_window: float | None = None) -> tuple[Any, FeedbackSource | None]:
        """The prior and the feedback source, shared with every session of the same configuration
        (``apa.components``; ``batch_window``: the prior's network calls batched across sessions);
        errors here happen before anything is written."""
        check_device(cfg.prior.device)
        prior = shared_prior(vars(cfg.prior), batch_window)
        check_prior(cfg, prior)
        source = shared_feedback(vars(cfg.feedback), prior, vars(cfg.prior))
        if cfg.feedback.label_noise and cfg.feedback.name == "human":
            raise SessionError("--label-noise simulates a user who errs; a person's own ratings are not flipped")
        noise, seed = cfg.feedback.label_noise, cfg.session.seed
        if cfg.feedback.drift_to is None:
            return prior, with_label_noise(source, noise, seed)
        after = shared_feedback({**vars(cfg.feedback), "prefer": cfg.feedback.drift_to}, prior, vars(cfg.prior))
        check_tastes(source, after)
        return prior, DriftingUser(with_label_noise(source, noise, seed), with_label_noise(after, noise, seed),
                                   cfg.feedback.drift_at, cfg.feedback.drift_span, seed)

    @classmethod
    def start(cls, out: Path, cfg: AlignConfig, progress: bool = True, kind: str = "fkc",
              components: tuple[Any, FeedbackSource | None] | None = None) -> "Session":
        """A new session in ``out``. ``kind`` names the method that runs it (a comparison's baselines
        run here too); ``components``: a prior and feedback source already built (else from ``cfg``)."""
        validate_new(cfg)
        prior, source = components if components is not None else cls.components(cfg)
        store = SessionStore.create(out, cfg.to_dict(), kind=kind)  # config.json included
        return cls(store, cfg, prior, source, progress)

    @classmethod
    def resume(cls, out: Path, progress: bool = True, budget: int | None = None, kind: str = "fkc",
               forget_before: int | None = None, batch_window: float | None = None) -> "Session":
        """Reopen the session in ``out`` (holding its lock); ``budget``: raise its budget to this first;
        ``forget_before``: the person's taste changed at this round (numbered from 1): forget the earlier ones;
        ``batch_window``: see :meth:`components`."""
        store = SessionStore.open(out)
        try:
            cfg = cls.stored_config(store, out, kind)
            prior, source = cls.components(cfg, batch_window)
            cfg = cls.changed_on_resume(store, cfg, budget, forget_before)
        except BaseException:
            store.close()
            raise
        session = cls(store, cfg, prior, source, progress)
        session.timings.update(store.record("timings") or {})  # the earlier runs' (stored by ``finish``)
        return session

    @staticmethod
    def changed_on_resume(store: SessionStore, cfg: AlignConfig, budget: int | None,
                          forget_before: int | None) -> AlignConfig:
        """Raise the budget and record the round the person's taste changed at (numbered from 1: the
        ratings of earlier rounds no longer hold; see ``check_forget_before``): both checked, then
        stored together in one commit (the database, config.json and the ledger), or neither."""
        changes = {k: v for k, v in (("budget", budget), ("forget_before", forget_before)) if v is not None}
        new = with_overrides(cfg, session=changes)  # checks each value
        validate(new)
        if budget is not None:
            store.check_budget(budget)
        if forget_before is not None:
            check_forget_before(store, cfg, new.session.budget, forget_before)
        changed = {k: v for k, v in changes.items() if v != getattr(cfg.session, k)}
        if changed:
            store.update_session(changed, " and ".join(CHANGES[k] for k in changed))
        return new

    @staticmethod
    def stored_config(store: SessionStore, out: Path, kind: str = "fkc") -> AlignConfig:
        """The configuration the session was made with; refuses a session of another kind."""
        if store.kind() != kind:
            raise StoreError(f"{out} holds a {store.kind()!r} session (a baseline run by `apa compare`), not an "
                             f"{kind!r} one; it cannot be resumed here and was left untouched")
        try:
            return AlignConfig.from_dict(store.config())
        except (ValueError, TypeError) as e:
            raise StoreError(f"{out}: the stored configuration is not readable ({e}); it was left untouched") from e

    # ------------------------------------------------------------ surrogate



    # ------------------------------------------------------------ the loop

    def next_round(self) -> int | None:
        """The round waiting for ratings (sampling it first if needed); None when the budget is spent."""
        action = next_action(self.store, self.cfg.session.budget)
        if action.kind == SAMPLE:
            self.sample_round(action.round)
        return action.round if action.kind in (SAMPLE, RATE, FIT) else None

    def record(self, r: int, position: int, score: float | None, source: str) -> None:
        self.record_all(r, [(position, score)], source)

    def record_all(self, r: int, scores: list[tuple[int, float | None]], source: str) -> None:
        """Store ratings of round r, (position, score or None), all or none."""
        with self.timer("io"):
            self.store.add_ratings(r, scores, source)

    def answer_with_source(self, r: int) -> None:
        """Ask the simulated user about every not-yet-rated image of round r; each answer is stored at once."""
        done = {x["position"] for x in self.store.ratings(r)}
        todo = [p for p in range(len(self.store.rounds()[r]["shown"])) if p not in done]
        if not todo:
            return
        images = self.shown_images(r)[todo]
        if isinstance(self.feedback, DriftingUser):  # its taste follows the count of ratings given
            self.feedback.at(self.store.spent())
        with self.timer("feedback"), torch.no_grad():
            scores = check_scores(self.feedback(images), len(todo), self.feedback.name)
        for p, s in zip(todo, scores.tolist()):
            self.record(r, p, float(s), self.feedback.name)

    def run(self, on_round: Callable[[int, "Session"], None] | None = None) -> None:
        """Rounds until the budget is spent (simulated feedback), each step the one ``next_action``
        names; ``on_round(r, session)`` after every refit."""
        if self.cfg.feedback.name == "human":
            raise SessionError("feedback 'human' is given through `apa serve`, not `apa align`")
        while (action := next_action(self.store, self.cfg.session.budget)).kind not in (FINAL, DONE):
            if action.kind == SAMPLE:
                self.sample_round(action.round)
            elif action.kind == RATE:
                self.answer_with_source(action.round)
            else:
                self.finish_round(action.round)
                if on_round is not None:
                    on_round(action.round, self)


CHANGES = {"budget": "raise the budget", "forget_before": "forget the ratings before a change of taste"}


def with_overrides(cfg: AlignConfig, **sections: dict[str, Any]) -> AlignConfig:
    """A copy of cfg with some fields of some sections replaced: with_overrides(cfg, session={"budget": 16})."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **vals) for name, vals in sections.items()})
