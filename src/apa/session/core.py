"""⑥ One person's session, made of named parts, its steps the ones ``next_action`` names.

The steps are durable; each writes through the store before the next begins:
  round r sampled (particles, log-weights, what is shown) -> each rating -> surrogate refit + round
  complete -> ... -> final batch and what its end measures.
Every random choice is seeded by (seed, round, purpose), so a session resumed after a crash at
any point ends with the same result as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from apa.config import AlignConfig
from apa.feedback.base import FeedbackSource, check_scores
from apa.feedback.drift import DriftingUser
from apa.measures.records import RECORDS, FinalView, measure_final
from apa.priors.calls import counting, uncounted
from apa.priors.ddpm import weights_path
from apa.seeding import generator
from apa.session import acquisition, components
from apa.session.checks import SessionError, check_forget_before, validate, validate_new
from apa.session.examples import GIVEN, examples_round, liked_examples
from apa.session.final import CUT_SAMPLES, cut_at, final_start, moved, start_features, unrepeated, with_cut
from apa.session.fitter import SurrogateFitter, heldout_score, reads_as_change
from apa.session.lifecycle import FIT, RATE, SAMPLE, next_action
from apa.session.sampler import RoundSampler, choose_shown, with_explored
from apa.session.state import SessionState, Timings
from apa.smc.distributed import Comm
from apa.smc.sampler import SMCResult, device_of
from apa.smc.weights import uniform
from apa.store import Store, StoreError, create, open_store
from apa.surrogate.model import Ensemble

CHANGES = {"budget": "raise the budget", "forget_before": "forget the ratings before a change of taste"}


class Session:
    """One person's session, held as named parts:

    - ``state``: the store and the configuration, with the read-only queries (:class:`SessionState`);
    - ``sampler``: the rounds' populations (:class:`RoundSampler`; sharded over ``comm``'s ranks);
    - ``fitter``: the surrogate (:class:`SurrogateFitter`);
    - ``prior`` and ``feedback``: the shared frozen networks and who rates (a person's source for a page);
    - ``timings``: seconds per part of the work, over all of the session's runs.
    """

    def __init__(self, store: Store, cfg: AlignConfig, prior: Any, feedback: FeedbackSource,
                 progress: bool = True, comm: Comm | None = None):
        self.state = SessionState(store, cfg, feedback.scale, prior.event_shape)
        self.prior, self.feedback = prior, feedback
        self.sampler = RoundSampler(prior, cfg.sampler, comm, progress)
        self.fitter = SurrogateFitter(prior, cfg.surrogate, cfg.session.seed)
        self.timings = Timings(store.record("timings"))  # the earlier runs' (stored at the end)
        self._final: tuple[tuple[int, int], torch.Tensor, int] | None = None  # the last final batch drawn

    @property
    def store(self) -> Store:
        return self.state.store

    @property
    def cfg(self) -> AlignConfig:
        return self.state.cfg

    # ------------------------------------------------------------ opening

    @classmethod
    def start(cls, out: Path, cfg: AlignConfig, progress: bool = True, kind: str = "fkc",
              parts: tuple[Any, FeedbackSource] | None = None, comm: Comm | None = None,
              database: str | None = None) -> "Session":
        """A new session in ``out``. ``kind`` names the method that runs it (a comparison's baselines run
        here too); ``parts``: a prior and feedback source already built (else ``components.build(cfg)``);
        ``database``: a PostgreSQL URL holding the session's rows (``out`` then holds its tensors and
        outputs; see ``apa.store.create``), else SQLite in ``out``."""
        validate_new(cfg)
        prior, source = parts if parts is not None else components.build(cfg)
        store = create(out, cfg.to_dict(), kind=kind, database=database)  # config.json included
        return cls(store, cfg, prior, source, progress, comm)

    @classmethod
    def resume(cls, out: Path, progress: bool = True, budget: int | None = None, kind: str = "fkc",
               forget_before: int | None = None, batch_window: float | None = None,
               comm: Comm | None = None, database: str | None = None) -> "Session":
        """Reopen the session in ``out`` (holding its lock); ``budget``: raise its budget to this first;
        ``forget_before``: the person's taste changed at this round (numbered from 1): forget the earlier
        ones; ``batch_window``: see ``components.build``; ``database``: see ``start``."""
        store = open_store(out, database)
        try:
            cfg = stored_config(store, out, kind)
            prior, source = components.build(cfg, batch_window)
            cfg = changed_on_resume(store, cfg, budget, forget_before)
        except BaseException:
            store.close()
            raise
        return cls(store, cfg, prior, source, progress, comm)

    def change_taste(self, at: int) -> None:
        """The person's taste changed at round ``at`` (numbered from 1): forget the ratings before it."""
        self.state.cfg = changed_on_resume(self.store, self.cfg, None, at)

    # ------------------------------------------------------------ SAMPLE

    def sample_round(self, r: int) -> None:
        """Sample round r, choose what to show, persist both (the round reaches the host once, here).
        Round 0 of a session started from examples (``--examples``) holds the simulated user's instead."""
        cfg, dev = self.cfg, device_of(self.prior)
        if r == 0 and cfg.session.examples:
            return self.give(liked_examples(self.feedback, cfg.prior.name, cfg.session.examples, cfg.session.seed))
        surrogate = self.surrogate_after(r - 1, dev)
        n, k = cfg.sampler.particles, min(cfg.session.per_round, cfg.session.budget - self.store.spent())
        if surrogate is not None and cfg.session.search != "tilt" and self.state.searching():
            return self.search_round(r, n, k)
        m = round(self.state.explore_share(r) * k) if surrogate is not None else 0
        h = round(cfg.session.search_on_miss * k) if m == 0 and self._searches_on_miss(r) else 0
        history = self.state.history_particles() if self.sampler.reads_history else None
        every = self._round_every(r)
        with counting() as calls:
            with self.timings.timer("sampling"):
                res = self.sampler.sample(self.fitter.reward(surrogate), surrogate, n,
                                          generator(cfg.session.seed, r, "sample"), history=history,
                                          desc=f"sampling round {r + 1}", beta_end=cfg.session.round_beta,
                                          reweight_every=every)
                if m:
                    res = with_explored(res, self.sampler.plain(m, generator(cfg.session.seed, r, "explore")))
            if h:
                plain, found = self.searched(n, h, generator(cfg.session.seed, r, "search"))
                res = with_explored(res, plain[found])
            res = res.cpu()  # the rules that read the surrogate (unsure, ucb) count its rows with the round's
            shown = choose_shown(cfg.session.acquisition, res, n, k - m - h, m + h, surrogate, dev, cfg.session.seed, r)
        info = {"ess": [s.ess for s in res.trace], "resampled": [s.resampled for s in res.trace],
                "unique_origins": res.trace[-1].unique_origins, "beta_used": surrogate is not None,
                "explored": m, "calls": calls.total}
        if h:
            info["searched"] = f"{cfg.session.search}, {h} of {k}"
        if surrogate is not None:
            info["log_z"] = float(res.log_normalizer)
        if every != cfg.sampler.reweight_every:
            info["reweight_every"] = every
        with self.timings.timer("io"):
            self.store.save_round(r, {"particles": res.particles, "log_weights": res.log_weights, "shown": shown},
                                  shown.tolist(), info)

    def search_round(self, r: int, n: int, k: int) -> None:
        """Round r while nothing is liked yet, by ``--search``: n plain prior samples, of which k are shown, at
        random ("plain") or each the farthest, in the surrogate's feature space, from every image rated and
        every one chosen ("farthest"). The population is the n plain samples at equal weights."""
        cfg = self.cfg
        with counting() as calls:
            particles, shown = self.searched(n, k, generator(cfg.session.seed, r, "sample"),
                                             generator(cfg.session.seed, r, "select"))
        info = {"ess": [], "resampled": [], "unique_origins": n, "beta_used": False, "explored": 0,
                "searched": cfg.session.search, "calls": calls.total}
        with self.timings.timer("io"):
            self.store.save_round(r, {"particles": particles, "log_weights": uniform(n), "shown": shown},
                                  shown.tolist(), info)

    def searched(self, n: int, k: int, gen: torch.Generator, pick: torch.Generator | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """n plain prior samples on the host [n, *event] and the k of them ``--search`` shows [k]: each the
        farthest, in the surrogate's feature space, from every image rated and every one chosen ("farthest"),
        or k at random ("plain", drawn by ``pick``, else by ``gen`` after the samples)."""
        cfg = self.cfg
        with self.timings.timer("sampling"):
            particles = self.sampler.plain(n, gen).cpu()
        if cfg.session.search == "farthest":
            seen = self.state.training_set()[0]
            space = start_features(self.prior, cfg.surrogate.feature_t, torch.cat([particles, seen]).to(
                device_of(self.prior))).double().cpu()
            return particles, acquisition.farthest_from(space[:n], space[n:], k)
        return particles, torch.randperm(n, generator=pick if pick is not None else gen)[:k]

    def _round_every(self, r: int) -> int:
        """``--reweight-every`` of round r: ``--mild-every`` where ``--mild-tilt`` is set and the round before was
        tilted with a normaliser E_prior[P^β] (its SMC run's estimate, stored with it) of at least ``--mild-tilt``:
        a common taste, whose mild tilt a run that reads the potential less often still follows."""
        sc, every = self.cfg.session, self.cfg.sampler.reweight_every
        if sc.mild_tilt is None or r == 0 or self.cfg.sampler.weights != "exact":
            return every
        log_z = self.store.rounds()[r - 1]["info"].get("log_z")
        return sc.mild_every if log_z is not None and log_z >= math.log(sc.mild_tilt) else every

    def _searches_on_miss(self, r: int) -> bool:
        """Whether round r shows part of its images by ``--search`` (``--search-on-miss``): the round before
        it was tilted and the user liked none of its tilted images."""
        sc = self.cfg.session
        return sc.search_on_miss > 0 and sc.search != "tilt" and self.state.tilt_missed(r - 1)

    def give(self, images: torch.Tensor) -> None:
        """Start the session from ``images`` [n, C, H, W] in [0, 1] the user already likes: round 0 holds
        them, each rated at the top of the user's scale (source "given"), counted in the budget."""
        if self.store.rounds():
            raise SessionError("examples start a session: this one already has rounds")
        tensors, info = examples_round(self.prior, images)
        with self.timings.timer("io"):
            self.store.save_round(0, tensors, tensors["shown"].tolist(), info)
            self.store.add_ratings(0, [(p, self.feedback.scale[1]) for p in range(images.shape[0])], GIVEN)

    def next_round(self) -> int | None:
        """The round waiting for ratings (sampling it first if needed); None when the budget is spent."""
        action = next_action(self.store, self.cfg.session.budget)
        if action.kind == SAMPLE:
            self.sample_round(action.round)
        return action.round if action.kind in (SAMPLE, RATE, FIT) else None

    def shown_images(self, r: int) -> torch.Tensor:
        """What round r showed, decoded: [k, C, H, W] in [0, 1]."""
        with torch.no_grad():
            return self.prior.decode(self.state.shown_particles(r))

    # ------------------------------------------------------------ RATE

    def record_all(self, r: int, scores: list[tuple[int, float | None]], source: str) -> None:
        """Store ratings of round r, (position, score or None), all or none."""
        with self.timings.timer("io"):
            self.store.add_ratings(r, scores, source)

    def answer(self, r: int) -> None:
        """Ask the simulated user about every not-yet-rated image of round r; each answer is stored at once."""
        done = {x["position"] for x in self.store.ratings(r)}
        todo = [p for p in range(len(self.store.rounds()[r]["shown"])) if p not in done]
        if not todo:
            return
        images = self.shown_images(r)[todo]
        if isinstance(self.feedback, DriftingUser):  # its taste follows the count of ratings given
            self.feedback.at(self.store.spent())
        with self.timings.timer("feedback"), torch.no_grad():
            scores = check_scores(self.feedback(images), len(todo), self.feedback.name)
        for p, s in zip(todo, scores.tolist()):
            self.record_all(r, [(p, float(s))], self.feedback.name)

    # ------------------------------------------------------------ FIT

    def surrogate_after(self, r: int, device: torch.device | None = None) -> Ensemble | None:
        """The surrogate fitted after round r or, if r fitted nothing, after the last round that did; on
        ``device`` (the sampler's, for a round) or the CPU. None before any feedback."""
        fitted = [q for q in range(r, -1, -1) if self.store.surrogate_path(q).exists()]
        if not fitted:
            return None  # no feedback yet (or every image so far was skipped)
        return self.fitter.load(fitted[0], self.store.load_surrogate(fitted[0]), device)  # skips keep the last fit

    def finish_round(self, r: int) -> float | None:
        """Refit the surrogate on the feedback remembered and mark round r complete. Returns the fit loss."""
        heldout = self._heldout(r)
        change = {"change_detected": True} if self._reads_as_change(r, heldout) else {}
        x, y, w = self.state.training_set(since=r if change else 0)
        if x.shape[0] == 0:  # every image so far skipped: nothing to fit, the next round samples the prior
            self.store.complete_round(r, None, None, {**self._evaluate_round(r), **change})
            return None
        with counting() as calls, self.timings.timer("surrogate_fit"):
            model, loss = self.fitter.fit(r, x, y, w)
        with self.timings.timer("evaluation"):
            info = {**self._evaluate_round(r), **({"surrogate_heldout": heldout} if heldout else {}), **change,
                    "fit_calls": calls.total}
        with self.timings.timer("io"):
            self.store.complete_round(r, loss, dict(model.state_dict()), info)
        return loss

    def _heldout(self, r: int) -> dict[str, float] | None:
        """How the surrogate fitted before round r predicted its ratings (``fitter.heldout_score``)."""
        rated = self.state.rated(r) if r > 0 else None
        return None if rated is None else heldout_score(self.surrogate_after(r - 1), *rated)

    def _reads_as_change(self, r: int, heldout: dict[str, float] | None) -> bool:
        start = self.state.forget_point()
        before = [row["info"]["surrogate_heldout"]["accuracy"] for row in self.store.rounds()
                  if start <= row["round"] < r and row["info"].get("surrogate_heldout")][-2:]
        return reads_as_change(self.cfg.session.detect_change, heldout, before)

    def _evaluate_round(self, r: int) -> dict[str, Any]:
        """The simulated user's view of the round's weighted population (no feedback is spent)."""
        if self.feedback.evaluate is None:
            return {}
        t = self.store.round_tensors(r)
        res = SMCResult(t["particles"], t["log_weights"])
        with torch.no_grad():
            images = self.prior.decode(res.resample(generator=generator(self.cfg.session.seed, r, "final")))
        return {"eval": self.feedback.evaluate(images)}

    # ------------------------------------------------------------ FINAL

    def final_samples(self, n: int | None = None) -> torch.Tensor:
        """The aligned sampler's evaluation batch from the last surrogate, resampled to equal weights:
        images [n, C, H, W]. A pure function of the store and n: the last one drawn is kept."""
        n = n or self.cfg.session.eval_samples
        key = (len(self.store.rounds()), n)
        if self._final is None or self._final[0] != key:
            with counting() as calls:
                images = self._draw_final(n)
            self._final = (key, images, calls.total)
        return self._final[1]

    def _draw_final(self, n: int) -> torch.Tensor:
        cfg, last = self.cfg, len(self.store.rounds()) - 1
        seed = cfg.session.seed
        surrogate = self.surrogate_after(last, device_of(self.prior))
        x, y, _ = self.state.training_set()
        particles_n, every = self._final_run(last, n)  # the run's particles; n images are resampled from them
        initial, start = final_start(self.prior, cfg, x[y > 0], particles_n, generator(seed, last + 1, "restart"))
        reward = self.fitter.reward(surrogate)
        history = self.state.history_particles() if self.sampler.reads_history else None
        with self.timings.timer("final_sampling"):
            cut = None
            if cfg.session.final_cut is not None and surrogate is not None:
                plain = self.sampler.plain(CUT_SAMPLES, generator(seed, last + 1, "cut"))
                cut = cut_at(reward, plain, cfg.session.final_cut, cfg.sampler.beta[1])
            res = self.sampler.sample(reward, surrogate, particles_n, generator(seed, last + 1, "final"),
                                      history=history, initial=initial, start_step=start, desc="final batch", cut=cut,
                                      reweight_every=every)
            reward = with_cut(reward, cut)
            particles = res.resample(n, generator(seed, last + 1, "select"))
            if cfg.session.final_move is not None:
                particles = moved(self.prior, reward, particles, cfg.session.final_move, cfg.sampler.beta[1],
                                  cfg.sampler.steps, generator(seed, last + 1, "move"), cfg.session.final_sweeps)
                particles = unrepeated(self.prior, reward, particles, cfg.session.final_move, cfg.sampler.beta[1],
                                       cfg.sampler.steps, generator(seed, last + 1, "repeats"),
                                       cfg.session.final_repeats, x, cfg.session.final_unseen)
        with torch.no_grad():
            return self.prior.decode(particles).cpu()

    def _final_run(self, last: int, n: int) -> tuple[int, int | None]:
        """The final batch's run after round ``last``, for n images: its particles (``--final-particles``,
        none: n) and ``--reweight-every`` (None: the sampler's; ``--mild-every`` after a mild round, with
        ``--mild-final``)."""
        every = self._round_every(last + 1)
        mild = self.cfg.session.mild_final and every != self.cfg.sampler.reweight_every
        return self.cfg.session.final_particles or n, every if mild else None

    def finish(self) -> Path:
        """The lifecycle's FINAL step: store the final batch, then what its end measures (the records the
        report shows) and the timings; returns the batch's path."""
        images = self.final_samples()
        path = self.store.save_final(images)
        with self.timings.timer("evaluation"), uncounted():  # measuring the batch is not its cost
            self._record(images, self._final[2])
        self.store.save_record("timings", dict(self.timings))  # a resumed session's report keeps them
        return path

    def records(self) -> dict[str, dict[str, Any]]:
        """The end's records as stored; a session whose final batch has none yet (it stopped between the
        two, or was finished by an older version) has them measured and stored first. Before the final
        batch exists every record is {}."""
        if not self.store.final_path.exists():
            return {name: {} for name in RECORDS}
        stored = {name: self.store.record(name) for name in RECORDS}
        if any(value is None for value in stored.values()):
            return self._record(self.store.final_images(), None)
        return stored

    def _record(self, images: torch.Tensor, final_calls: int | None) -> dict[str, dict[str, Any]]:
        """Measure the end's records of the final batch and store them (durably, one by one)."""
        measured = measure_final(self.final_view(images))
        if final_calls is not None:
            measured["final_checks"]["final_calls"] = final_calls
            particles, every = self._final_run(len(self.store.rounds()) - 1, images.shape[0])
            if every is not None:
                measured["final_checks"]["final_run"] = {"particles": particles, "reweight_every": every}
        for name, value in measured.items():
            self.store.save_record(name, value)
        return measured

    def final_view(self, images: torch.Tensor) -> FinalView:
        """What the end measures of the final batch ``images`` [n, C, H, W] (``measures.records``)."""
        cfg = self.cfg
        x, y, _ = self.state.training_set()
        weights = cfg.prior.weights or _builtin_weights(cfg.prior.name)
        return FinalView(images, x, y, self.prior, self.feedback,
                         self.fitter.reward(self.surrogate_after(len(self.store.rounds()) - 1)), cfg.sampler,
                         cfg.session.eval_samples, cfg.session.final_start == "noise",
                         Path(weights) if weights else None)


def _builtin_weights(name: str) -> str | None:
    """The weights file of a built-in prior (None for one without: the Gaussian mixture, a hub model)."""
    try:
        return str(weights_path(name))
    except Exception:  # not a built-in pixel prior
        return None


def stored_config(store: Store, out: Path, kind: str = "fkc") -> AlignConfig:
    """The configuration the session was made with; refuses a session of another kind."""
    if store.kind() != kind:
        raise StoreError(f"{out} holds a {store.kind()!r} session (a baseline run by `apa compare`), not an "
                         f"{kind!r} one; it cannot be resumed here and was left untouched")
    try:
        return AlignConfig.from_dict(store.config())
    except (ValueError, TypeError) as e:
        raise StoreError(f"{out}: the stored configuration is not readable ({e}); it was left untouched") from e


def changed_on_resume(store: Store, cfg: AlignConfig, budget: int | None,
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


def with_overrides(cfg: AlignConfig, **sections: dict[str, Any]) -> AlignConfig:
    """A copy of cfg with some fields of some sections replaced: with_overrides(cfg, session={"budget": 16})."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **vals) for name, vals in sections.items()})
