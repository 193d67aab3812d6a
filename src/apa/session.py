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

from apa import acquisition
from apa.config import MAX_POPULATION, NUM_TIMESTEPS, AlignConfig
from apa.feedback.base import FeedbackSource, check_scores, scale_of, with_label_noise
from apa.feedback.drift import DriftingUser
from apa.lifecycle import DONE, FINAL, FIT, RATE, SAMPLE, next_action
from apa.priors.base import HasFeatures
from apa.components import shared_feedback, shared_prior
from apa.seeding import generator, seeded_global
from apa.smc.sampler import SMCResult, device_of, fkc_sample, sample_prior, zero_reward
from apa.store import SessionStore, StoreError
from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate, LatentSurrogate



class SessionError(ValueError):
    """The session cannot run as configured; the message says what to change."""


def normalise_scores(scores: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Map a source's scores from its scale [lo, hi] onto the surrogate's target range [-1, 1]."""
    lo, hi = scale
    return 2.0 * (scores - lo) / (hi - lo) - 1.0


def validate(cfg: AlignConfig) -> None:
    """The checks across sections (each section checks its own fields when it is built)."""
    s = cfg.session
    if s.budget < s.per_round:
        raise SessionError(f"--budget {s.budget} is below --per-round {s.per_round}: not even one round fits; "
                           "raise the budget or lower the images per round")
    if cfg.sampler.particles < s.per_round:
        raise SessionError(f"--particles {cfg.sampler.particles} is below --per-round {s.per_round}: "
                           "a round cannot show more particles than it samples")
    if cfg.sampler.particles > MAX_POPULATION:
        raise SessionError(f"--particles {cfg.sampler.particles} is past {MAX_POPULATION}, more than a session's "
                           "memory holds; lower it")
    f = cfg.feedback
    if f.drift_at is not None and f.name != "oracle":
        raise SessionError(f"--drift-to simulates an oracle user whose taste changes; it needs --feedback oracle, "
                           f"not {f.name}")
    if f.drift_at is not None and f.drift_at >= s.budget:
        raise SessionError(f"--drift-at {f.drift_at} is not before the end of the budget ({s.budget} ratings): "
                           "the taste would never change; lower --drift-at or raise --budget")
    if cfg.sampler.steps > NUM_TIMESTEPS:
        raise SessionError(f"--steps {cfg.sampler.steps} is past the prior's {NUM_TIMESTEPS} training timesteps; "
                           "lower it")


def check_device(device: str | None) -> None:
    """Refuse a --device this machine does not have (the configuration checked how it is spelled)."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "mps":
        present = torch.backends.mps.is_available()
    else:
        backend = getattr(torch, dev.type, None)
        present = dev.type == "cpu" or (backend is not None and backend.is_available()
                                        and (dev.index is None or dev.index < backend.device_count()))
    if not present:
        raise SessionError(f"--device {device}: this machine has no such device; use --device cpu, or none to "
                           "take a GPU when there is one")


def check_prior(cfg: AlignConfig, prior: Any) -> None:
    """Refuse a prior the rest of the configuration cannot use: every feedback source rates images
    [C, H, W], and the features surrogate reads the prior's denoiser."""
    if len(prior.event_shape) != 3:
        raise SessionError(f"--prior {cfg.prior.name} draws points of shape {tuple(prior.event_shape)}, not images, "
                           "so no feedback source can rate them (it serves the sampler's exactness tests); choose an "
                           "image prior such as mnist")
    if cfg.surrogate.kind == "features" and not isinstance(prior, HasFeatures):
        raise SessionError(f"--prior {cfg.prior.name} has no denoiser features; use --surrogate pixels")


class Session:
    """One user's session: the store, the configuration, the prior and who rates."""

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
        return prior, DriftingUser(with_label_noise(source, noise, seed), with_label_noise(after, noise, seed),
                                   cfg.feedback.drift_at, cfg.feedback.drift_span, seed)

    @classmethod
    def start(cls, out: Path, cfg: AlignConfig, progress: bool = True, kind: str = "fkc",
              components: tuple[Any, FeedbackSource | None] | None = None) -> "Session":
        """A new session in ``out``. ``kind`` names the method that runs it (a comparison's baselines
        run here too); ``components``: a prior and feedback source already built (else from ``cfg``)."""
        validate(cfg)
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
        return cls(store, cfg, prior, source, progress)

    @staticmethod
    def changed_on_resume(store: SessionStore, cfg: AlignConfig, budget: int | None,
                          forget_before: int | None) -> AlignConfig:
        """Raise the budget and record the round the person's taste changed at (numbered from 1: the
        ratings of earlier rounds no longer hold), each checked before either is written."""
        changes = {k: v for k, v in (("budget", budget), ("forget_before", forget_before)) if v is not None}
        new = with_overrides(cfg, session=changes)  # checks each value
        validate(new)
        held = len(store.rounds())
        if forget_before is not None and forget_before > held + 1:
            raise SessionError(f"--forget-before {forget_before}: this session has {held} round(s); forget the "
                               f"rounds before one of rounds 1 to {held + 1}")
        if budget is not None and budget != cfg.session.budget:
            store.extend_budget(budget)
        if forget_before is not None:
            store.set_session_option("forget_before", forget_before, "forget the ratings before a change of taste")
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

    def new_surrogate(self, r: int) -> Ensemble:
        """Fresh members, initialised from (seed, round): [M] surrogates of the configured kind."""
        sc = self.cfg.surrogate
        if sc.kind == "features":
            if not isinstance(self.prior, HasFeatures):
                raise SessionError(f"prior {self.cfg.prior.name!r} has no denoiser features; use --surrogate pixels")
            fn = lambda x: self.prior.features(x, sc.feature_t)  # noqa: E731
            dim = int(fn(torch.zeros(1, *self.prior.event_shape)).shape[1])
        with seeded_global(self.cfg.session.seed, r, "init"):
            if sc.kind == "features":
                members = [FeatureSurrogate(fn, dim) for _ in range(sc.ensemble)]
            else:
                members = [LatentSurrogate(self.prior.event_shape[0]) for _ in range(sc.ensemble)]
        return Ensemble(members, sc.loss).eval()

    def surrogate_after(self, r: int, device: torch.device | None = None) -> Ensemble | None:
        """The surrogate fitted after round r or, if r fitted nothing, after the last round that did;
        on ``device`` (the sampler's, for a round) or the CPU."""
        fitted = [q for q in range(r, -1, -1) if self.store.surrogate_path(q).exists()]
        if not fitted:
            return None  # no feedback yet (or every image so far was skipped)
        model = self.new_surrogate(fitted[0])  # a round of skips only keeps the last fit
        model.load_state_dict(self.store.load_surrogate(fitted[0]))
        return model.requires_grad_(False).to(device or "cpu")

    # ------------------------------------------------------------ one round

    def sample(self, surrogate: Ensemble | None, n: int, gen: torch.Generator, initial: torch.Tensor | None = None,
               start_step: int = 0, desc: str = "sampling") -> SMCResult:
        """FKC-SMC with the surrogate as reward (plain prior sampling before any feedback), from the
        noise end or from ``initial`` particles [n, *event] at grid point ``start_step``.

        The run lives on the prior's device (with the surrogate, ``surrogate_after(r, device)``), and so
        does its result: a round copies it to the host once, for the store and the user."""
        sc = self.cfg.sampler
        cfg = replace(sc, particles=n, beta=sc.beta if surrogate is not None else (0.0, 0.0))
        history = self.history_particles() if sc.diversity and sc.diversity_history else None
        if self.comm is not None:  # every rank runs its share of the same request
            return self.sample_sharded(self.comm.broadcast_object(sharding_request(
                cfg, surrogate, gen, history, initial, start_step, desc)))
        return fkc_sample(self.prior, self.reward(surrogate), cfg, historical=history, generator=gen,
                          initial=initial, start_step=start_step, progress=self.progress, desc=desc)

    def sample_sharded(self, request: dict[str, Any]) -> SMCResult:
        """One rank's part in sampling a population sharded over ``self.comm`` (:func:`sharding_request`
        says what rank 0 sends); every rank returns the whole result, on the host."""
        from apa.smc.distributed import sharded_sample

        dev = device_of(self.prior)
        surrogate = None
        if request["surrogate"] is not None:  # the surrogate's parameters, broadcast by rank 0 each round
            surrogate = self.new_surrogate(0)
            surrogate.load_state_dict(request["surrogate"])
            surrogate = surrogate.requires_grad_(False).to(dev)
        gen = torch.Generator().set_state(request["generator"])
        micro_batch = MICRO_BATCH if dev.type == "cpu" else None
        return sharded_sample(self.prior, self.reward(surrogate), request["cfg"], self.comm, generator=gen,
                              historical=request["historical"], initial=request["initial"],
                              start_step=request["start_step"], micro_batch=micro_batch,
                              progress=self.progress, desc=request["desc"]).cpu()

    def reward(self, surrogate: Ensemble | None) -> Callable[[torch.Tensor], torch.Tensor]:
        """The sampler's reward: zero before any feedback; log P(liked | x) for the logistic surrogate;
        the mse surrogate's rating capped at ``surrogate.ceiling`` (on the [-1, 1] scale). The cap
        keeps the surrogate's noise among images it already rates as liked from being amplified by
        exp(β·r) into a collapse onto one class; log P(liked | x) saturates at 0 by itself."""
        if surrogate is None:
            return zero_reward
        ceiling = self.cfg.surrogate.ceiling
        if surrogate.loss != "mse" or ceiling is None:
            return surrogate
        return lambda z: surrogate(z).clamp(max=ceiling)

    def sample_round(self, r: int) -> None:
        """Sample round r, choose what to show, persist both (the round reaches the host once, here)."""
        seed, dev = self.cfg.session.seed, device_of(self.prior)
        surrogate = self.surrogate_after(r - 1, dev)
        n = self.cfg.sampler.particles
        with self.timer("sampling"):
            res = self.sample(surrogate, n, generator(seed, r, "sample"), desc=f"sampling round {r + 1}")
        k = min(self.cfg.session.per_round, self.cfg.session.budget - self.store.spent())
        m = round(self.explore_share(r) * k) if surrogate is not None else 0
        if m:
            res = self.explored(r, m, res)
        res = res.cpu()
        cand = acquisition.Candidates(res.particles[:n], res.log_weights[:n],
                                      _on_host(surrogate.rating if surrogate is not None else None, dev),
                                      _on_host(surrogate.spread if surrogate is not None else None, dev))
        shown = acquisition.select(self.cfg.session.acquisition, cand, k - m, generator(seed, r, "select"))
        shown = torch.cat([shown, torch.arange(n, n + m, dtype=shown.dtype)])
        info = {"ess": [s.ess for s in res.trace], "resampled": [s.resampled for s in res.trace],
                "unique_origins": res.trace[-1].unique_origins, "beta_used": surrogate is not None,
                "explored": m}
        with self.timer("io"):
            self.store.save_round(r, {"particles": res.particles, "log_weights": res.log_weights, "shown": shown},
                                  shown.tolist(), info)

    def explore_share(self, r: int) -> float:
        """The share of round r's shown images drawn from the plain prior: ``explore`` in the first
        ``explore_rounds`` guided rounds (every one when none) and in as many after a detected change
        of taste, 0 otherwise."""
        sc = self.cfg.session
        guided = r - max([self.first_guided_round(), *[c + 1 for c in self.changes()]])
        return sc.explore if sc.explore_rounds is None or guided < sc.explore_rounds else 0.0

    def first_guided_round(self) -> int:
        """The first round sampled with a surrogate: the one after the first round that fitted one."""
        fitted = [row["round"] for row in self.store.rounds() if self.store.surrogate_path(row["round"]).exists()]
        return fitted[0] + 1 if fitted else len(self.store.rounds())

    def explored(self, r: int, m: int, res: SMCResult) -> SMCResult:
        """``res`` with m plain prior samples appended, weight zero (log −inf: no part of the weighted
        population), to be shown beside the tilted particles: particles [N+m, *event], log-weights [N+m]."""
        with self.timer("sampling"):
            plain = sample_prior(self.prior, m, self.cfg.sampler.steps, generator(self.cfg.session.seed, r, "explore"),
                                 batch_size=m, decode=False, config=self.cfg.sampler)
        lw = res.log_weights
        return SMCResult(torch.cat([res.particles, plain.to(res.particles)]),
                         torch.cat([lw, torch.full((m,), float("-inf"), dtype=lw.dtype, device=lw.device)]),
                         res.trace, res.log_normalizer)

    def shown_images(self, r: int) -> torch.Tensor:
        """What round r showed, decoded: [k, C, H, W] in [0, 1]."""
        t = self.store.round_tensors(r)
        with torch.no_grad():
            return self.prior.decode(t["particles"][t["shown"].long()])

    def history_particles(self) -> torch.Tensor | None:
        """All particles shown so far [H, *event] (for diversity against history)."""
        xs = [self.store.round_tensors(row["round"]) for row in self.store.rounds()]
        parts = [t["particles"][t["shown"].long()] for t in xs]
        return torch.cat(parts) if parts else None

    def rated_rounds(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """Per round with ratings: (round, its rated particles [m, *event], their targets in [-1, 1] [m])."""
        out = []
        scale = scale_of(self.feedback)
        for row in self.store.rounds():
            rated = [x for x in self.store.ratings(row["round"]) if x["score"] is not None]
            if rated:
                parts = self.store.round_tensors(row["round"])["particles"]
                out.append((row["round"], parts[torch.tensor([x["particle"] for x in rated])],
                            normalise_scores(torch.tensor([x["score"] for x in rated], dtype=torch.float32), scale)))
        return out

    def training_set(self, since: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the surrogate is refit on: the rated particles of the rounds remembered (from
        ``forget_point()``, or ``since`` if later), the last ``--window`` of them, with the weight
        ``--discount`` ** (rounds of age) each: ([n, *event], targets [n], weights [n] or None when
        every weight is 1)."""
        start = max(self.forget_point(), since)
        rounds = [(r, x, y) for r, x, y in self.rated_rounds() if r >= start]
        if not rounds:
            return torch.zeros(0, *self.prior.event_shape), torch.zeros(0), None
        x, y = torch.cat([x for _, x, _ in rounds]), torch.cat([y for _, _, y in rounds])
        age = torch.cat([torch.full((len(y),), rounds[-1][0] - r, dtype=torch.float32) for r, _, y in rounds])
        sc = self.cfg.surrogate
        keep = slice(-sc.window, None) if sc.window is not None else slice(None)
        w = None if sc.discount == 1.0 else sc.discount ** age[keep]
        return x[keep], y[keep], w

    def training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The surrogate's training particles and targets in [-1, 1]: ([n, *event], [n])."""
        x, y, _ = self.training_set()
        return x, y

    def changes(self) -> list[int]:
        """The rounds where the taste changed, in order: each detected one (``--detect-change``) and the
        one the person named (``--forget-before``, numbered from 1; stored here from 0)."""
        detected = [row["round"] for row in self.store.rounds() if row["info"].get("change_detected")]
        said = self.cfg.session.forget_before
        return sorted(set(detected + ([said - 1] if said is not None else [])))

    def forget_point(self) -> int:
        """The first round whose ratings are remembered: the last change of taste (0: every round)."""
        return max([0, *self.changes()])

    def detects_change(self, r: int, heldout: dict[str, float] | None) -> bool:
        """Round r reads as a change of taste: the surrogate fitted before it agreed with at most
        ``--detect-change`` of its ratings, after agreeing with at least 1 − that share of the two
        rounds before it (since the last change): a surrogate that was right and is now wrong, not
        one still learning."""
        threshold = self.cfg.session.detect_change
        if threshold is None or heldout is None or heldout["accuracy"] > threshold:
            return False
        start = self.forget_point()
        before = [row["info"]["surrogate_heldout"]["accuracy"] for row in self.store.rounds()
                  if start <= row["round"] < r and row["info"].get("surrogate_heldout")][-2:]
        return len(before) == 2 and sum(before) / 2 >= 1.0 - threshold

    def liked_shares(self) -> list[float | None]:
        """Per round, the share of its rated shown images the user liked (a rating above the scale's
        midpoint); None for a round with no rating. What a person saw, round by round."""
        lo, hi = scale_of(self.feedback)
        out = []
        for row in self.store.rounds():
            scores = [x["score"] for x in self.store.ratings(row["round"]) if x["score"] is not None]
            out.append(sum(s > (lo + hi) / 2 for s in scores) / len(scores) if scores else None)
        return out

    def finish_round(self, r: int) -> float | None:
        """Refit the surrogate on the feedback remembered and mark round r complete. Returns the fit loss."""
        heldout = self.heldout_score(r)
        change = {"change_detected": True} if self.detects_change(r, heldout) else {}
        x, y, w = self.training_set(since=r if change else 0)
        if x.shape[0] == 0:  # every image so far skipped: nothing to fit, the next round samples the prior
            self.store.complete_round(r, None, None, {**self.evaluate_round(r), **change})
            return None
        model = self.new_surrogate(r)
        sc = self.cfg.surrogate
        with self.timer("surrogate_fit"):
            loss = fit(model, x, y, FitConfig(sc.epochs, sc.batch_size, sc.lr), generator(self.cfg.session.seed, r, "fit"),
                       w)
        with self.timer("evaluation"):
            info = {**self.evaluate_round(r), **({"surrogate_heldout": heldout} if heldout else {}), **change}
        with self.timer("io"):
            self.store.complete_round(r, loss, {k: v for k, v in model.state_dict().items()}, info)
        return loss

    def heldout_score(self, r: int) -> dict[str, float] | None:
        """How well the surrogate fitted before round r predicted round r's ratings, before seeing them:
        the share of ratings on the same side of the scale's midpoint (accuracy) and the mean absolute
        error on the [-1, 1] scale, over the n images rated. None when there is nothing to score."""
        surrogate = self.surrogate_after(r - 1) if r > 0 else None
        rated = [x for x in self.store.ratings(r) if x["score"] is not None]
        if surrogate is None or not rated:
            return None
        x = self.store.round_tensors(r)["particles"][torch.tensor([x["particle"] for x in rated])]
        y = normalise_scores(torch.tensor([x["score"] for x in rated], dtype=torch.float32),
                             scale_of(self.feedback))
        with torch.no_grad():
            pred = surrogate.rating(x).reshape(-1).float().cpu()
        return {"accuracy": float(((pred > 0) == (y > 0)).float().mean()), "mae": float((pred - y).abs().mean()),
                "n": len(rated)}

    def evaluate_round(self, r: int) -> dict[str, Any]:
        """The simulated user's view of the round's weighted population (no feedback is spent)."""
        evaluate = getattr(self.feedback, "evaluate", None)
        if evaluate is None:
            return {}
        t = self.store.round_tensors(r)
        res = SMCResult(t["particles"], t["log_weights"])
        with torch.no_grad():
            images = self.prior.decode(res.resample(generator=generator(self.cfg.session.seed, r, "final")))
        return {"eval": evaluate(images)}

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

    def final_samples(self, n: int | None = None) -> torch.Tensor:
        """The aligned sampler's evaluation batch, resampled to equal weights: images [n, C, H, W]."""
        n = n or self.cfg.session.eval_samples
        last = len(self.store.rounds()) - 1
        surrogate = self.surrogate_after(last, device_of(self.prior))
        seed = self.cfg.session.seed
        initial, start = self.final_start(n, generator(seed, last + 1, "restart"))
        with self.timer("final_sampling"):
            res = self.sample(surrogate, n, generator(seed, last + 1, "final"), initial=initial, start_step=start,
                              desc="final batch")
        with torch.no_grad():
            return self.prior.decode(res.resample(n, generator(seed, last + 1, "select"))).cpu()

    def final_start(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor | None, int]:
        """Where the final batch starts: the noise end (None, 0), or, with ``final_start="liked"``,
        n draws from the liked rated particles noised to σ_k, k = steps − round(restart·steps):
        z = x0 + σ_k·ξ ([n, *event], k). The sampler then targets the prior's plain sampler from
        those particles tilted by exp(β_end·r): best-of-N's refinement, reweighted by the surrogate.
        ``"balanced"`` draws the liked particles with weights ∝ 1/local density in the prior's feature
        space, so a liked mode the rounds showed rarely starts as many particles as a crowded one."""
        sc, steps = self.cfg.session, self.cfg.sampler.steps
        if sc.final_start == "noise":
            return None, 0
        x, y = self.training_data()
        liked = x[y > 0]
        k = steps - round(sc.restart * steps)
        if liked.shape[0] == 0 or k <= 0:
            return None, 0  # nothing liked yet: the noise end
        sigma = float(self.prior.sigmas(steps)[k])
        if sc.final_start == "balanced":
            w = acquisition.balanced_weights(self.start_features(liked))
            pick = liked[torch.multinomial(w, n, replacement=True, generator=gen)]
        else:
            pick = liked[torch.randint(0, liked.shape[0], (n,), generator=gen)]
        return pick + sigma * torch.randn(pick.shape, generator=gen).to(pick), k

    def start_features(self, x: torch.Tensor) -> torch.Tensor:
        """What the balanced restart measures crowding in: the prior's denoiser features where it has
        them (the surrogate's input), else the particles themselves. [m, *event] -> [m, d]."""
        with torch.no_grad():
            if isinstance(self.prior, HasFeatures):
                return self.prior.features(x, self.cfg.surrogate.feature_t)
            return x.reshape(x.shape[0], -1)

    def save_final(self, n: int | None = None, images: torch.Tensor | None = None) -> Path:
        """Draw the final batch (or take ``images`` already drawn) and store it; returns its path."""
        return self.store.save_final(self.final_samples(n) if images is None else images)


MICRO_BATCH = 4  # particles per network call in a sharded run on the CPU: any rank count splitting N into
#                 multiples of it gives the same networks' results, so the same session bit for bit


def sharding_request(cfg: Any, surrogate: Ensemble | None, gen: torch.Generator, historical: torch.Tensor | None,
                     initial: torch.Tensor | None, start_step: int, desc: str) -> dict[str, Any]:
    """What rank 0 sends every rank to sample one population: the sampler's configuration, the
    surrogate's parameters (host copies), the generator's state and the run's tensors."""
    params = None if surrogate is None else {k: v.cpu() for k, v in surrogate.state_dict().items()}
    return {"cfg": cfg, "surrogate": params, "generator": gen.get_state(), "historical": historical,
            "initial": initial, "start_step": start_step, "desc": desc}


def _on_host(fn: Callable[[torch.Tensor], torch.Tensor] | None,
             device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``fn``, a function of particles on ``device``, called with host particles and answering on the
    host (acquisition runs once per round, on the host copy of the round that the store receives)."""
    return None if fn is None else (lambda x: fn(x.to(device)).cpu())


def with_overrides(cfg: AlignConfig, **sections: dict[str, Any]) -> AlignConfig:
    """A copy of cfg with some fields of some sections replaced: with_overrides(cfg, session={"budget": 16})."""
    return replace(cfg, **{name: replace(getattr(cfg, name), **vals) for name, vals in sections.items()})
