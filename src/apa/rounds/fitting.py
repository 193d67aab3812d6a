"""⑥ FIT: the surrogate refit on the ratings the session remembers, and what the round measured.

What is remembered starts at the last change of taste (named by the person, or detected); the
surrogate after round r is stored with the round, so a resumed session reloads it.
"""

from __future__ import annotations

from typing import Any

import torch

from apa.feedback.base import scale_of
from apa.priors.base import HasFeatures
from apa.priors.calls import counting
from apa.rounds.checks import SessionError
from apa.seeding import generator, seeded_global
from apa.smc.sampler import SMCResult
from apa.surrogate.fit import FitConfig, fit
from apa.surrogate.model import Ensemble, FeatureSurrogate, LatentSurrogate


def normalise_scores(scores: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    """Map a source's scores from its scale [lo, hi] onto the surrogate's target range [-1, 1]."""
    lo, hi = scale
    return 2.0 * (scores - lo) / (hi - lo) - 1.0


class Fitting:
    """Refitting the surrogate: a part of :class:`apa.session.Session` (reads its store, cfg, prior,
    feedback, timer)."""

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
        keep = slice(-min(sc.window, len(y)), None) if sc.window is not None else slice(None)  # past n: all n
        w = None if sc.discount == 1.0 else sc.discount ** age[keep]
        return x[keep], y[keep], w

    def training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The surrogate's training particles and targets in [-1, 1]: ([n, *event], [n])."""
        x, y, _ = self.training_set()
        return x, y

    def changes(self) -> list[int]:
        """The rounds where the taste changed, in order: each detected one (``--detect-change``) and each
        one the person named (``--forget-before``, numbered from 1; stored here from 0)."""
        detected = [row["round"] for row in self.store.rounds() if row["info"].get("change_detected")]
        said = [*self.store.forget_marks(), self.cfg.session.forget_before]
        return sorted(set(detected + [m - 1 for m in said if m is not None]))

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
        with counting() as calls, self.timer("surrogate_fit"):
            loss = fit(model, x, y, FitConfig(sc.epochs, sc.batch_size, sc.lr), generator(self.cfg.session.seed, r, "fit"),
                       w)
        with self.timer("evaluation"):
            info = {**self.evaluate_round(r), **({"surrogate_heldout": heldout} if heldout else {}), **change,
                    "fit_calls": calls.total}
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
